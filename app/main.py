"""The FastAPI app: `create_app()` for tests and ASGI servers, `run_server()` for `lightvlm serve`."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator
from types import FrameType
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from pydantic import BaseModel

from app.connections import http_protocol
from app.errors import install_error_handlers
from app.images import PixelBudget
from app.middleware import ApiKeyMiddleware, BodySizeLimitMiddleware, RequestContextMiddleware
from app.replica import ReplicaHeaderMiddleware
from app.routes import generate, health, openai, playground
from app.schemas import ChatCompletionRequest, GenerateRequest
from app.service import Service
from app.settings import Settings, get_settings
from lightvlm_core import __version__


def create_app(settings: Settings | None = None, engine: Any | None = None) -> FastAPI:
    """Build the service. With `engine` given as an object (a runner or an offline Engine), it runs
    in a thread of this process (ready once startup completes); otherwise the model of `settings`
    is loaded in the background in an engine process (`engine` may name its runner builder as
    "module:function") and /ready says when it is up."""
    settings = settings or get_settings()
    if engine is None or isinstance(engine, str):  # the app loads the model: name it after hub id or directory
        settings = settings.with_default_served_name()
    service = Service(settings, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        startup: asyncio.Task[None] | None = None
        if engine is not None and not isinstance(engine, str):
            await service.start()
        else:
            startup = asyncio.create_task(service.start())
        try:
            yield
        finally:
            if startup is not None and not startup.done():
                startup.cancel()
            await service.stop()

    app = FastAPI(title="LightVLM Serve", version=__version__, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    # Added innermost first: the request-id/access-log middleware wraps everything else.
    app.state.pixel_budget = PixelBudget(settings.max_decoded_pixels, max_waiting=settings.max_queue)
    app.add_middleware(
        BodySizeLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        on_reject=service.metrics.reject,
        read_timeout_s=settings.body_read_timeout_s,
        max_incomplete_uploads=settings.max_incomplete_uploads,
    )
    app.add_middleware(  # before the body is read, on every route (app.middleware.PUBLIC_PATHS aside)
        ApiKeyMiddleware,
        api_key=settings.api_key,
        protect_docs=settings.docs_require_api_key,
        on_reject=service.metrics.reject,
    )
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(ReplicaHeaderMiddleware)  # outermost: every response, errors too
    for module in (health, generate, openai, playground):
        app.include_router(module.router)
    _document_schemas(app, [GenerateRequest, ChatCompletionRequest])
    return app


def run_server(
    host: str | None = None,
    port: int | None = None,
    model: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    preset: str | None = None,
    trust_remote_code: bool | None = None,
) -> None:
    """Serve with uvicorn until interrupted; arguments left None come from LIGHTVLM_* settings.
    Exits with status 1 if the model fails to load or warm up."""
    import uvicorn

    from app.logs import configure_logging

    overrides = {
        "host": host,
        "port": port,
        "model": model,
        "device": device,
        "dtype": dtype,
        "preset": preset,
        "trust_remote_code": trust_remote_code or None,  # the CLI flag can only turn it on
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    configure_logging(settings.log_level)
    app = create_app(settings)
    service: Service = app.state.service
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # app.middleware logs one JSON line per request
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        http=http_protocol(settings.header_timeout_s, settings.max_header_bytes, service.metrics.reject),
    )

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT uvicorn closes the listening socket and waits up to the grace period
        for open requests; the service also answers 503 to any request that still arrives."""

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            service.begin_drain(settings.shutdown_grace_s)
            super().handle_exit(sig, frame)

    server = DrainingServer(config)
    failures: list[BaseException] = []

    def on_failure(exc: BaseException) -> None:
        failures.append(exc)
        server.should_exit = True

    service.on_failure = on_failure
    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; for SIGTERM
    # that would kill the process with status -15: a drained shutdown exits 0 instead.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None) if main_thread else None
    try:
        server.run()
    except KeyboardInterrupt:  # likewise for Ctrl-C
        pass
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
    if failures:
        raise SystemExit(1)


def _document_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Add request models that routes parse by hand (JSON or multipart) to the OpenAPI schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
