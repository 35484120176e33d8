"""Pure-ASGI middleware (safe with streaming responses): request id + access log, body limit."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import BodyTooLargeError, error_body
from app.logs import request_id_var

logger = logging.getLogger("app.access")

request_start_var: ContextVar[float | None] = ContextVar("lightvlm_request_start", default=None)
_id_from_client_var: ContextVar[bool] = ContextVar("lightvlm_request_id_from_client", default=False)
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


def generation_request_id() -> str:
    """The scheduler's id for this HTTP request's generation: the X-Request-ID when the server
    assigned it (unique), else the client's id plus a random suffix (clients may reuse theirs)."""
    request_id = request_id_var.get()
    if request_id is None:
        return uuid.uuid4().hex
    return f"{request_id}-{uuid.uuid4().hex[:8]}" if _id_from_client_var.get() else request_id


def request_start() -> float:
    """time.monotonic() when the current HTTP request arrived (now, outside a request)."""
    start = request_start_var.get()
    return start if start is not None else time.monotonic()


class RequestContextMiddleware:
    """Honours or assigns X-Request-ID, returns it, and logs one JSON access line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = _header(scope, b"x-request-id")
        from_client = bool(incoming and _VALID_REQUEST_ID.match(incoming))
        request_id = incoming if from_client and incoming else uuid.uuid4().hex
        start = time.monotonic()
        tokens = (
            request_id_var.set(request_id),
            request_start_var.set(start),
            _id_from_client_var.set(from_client),
        )
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = scope.get("path", "")
            quiet = path in _PROBE_PATHS and status < 500  # probes: debug level, or they drown the log
            logger.log(
                logging.DEBUG if quiet else logging.INFO,
                "%s %s %d",
                scope.get("method"),
                path,
                status,
                extra={
                    "method": scope.get("method"),
                    "path": path,
                    "status": status,
                    "duration_ms": round((time.monotonic() - start) * 1e3, 2),
                    "client": (scope.get("client") or ("", 0))[0],
                },
            )
            request_id_var.reset(tokens[0])
            request_start_var.reset(tokens[1])
            _id_from_client_var.reset(tokens[2])


class BodySizeLimitMiddleware:
    """413 for bodies over `max_body_bytes`: at once from Content-Length, else while reading."""

    def __init__(
        self, app: ASGIApp, max_body_bytes: int, on_reject: Callable[[str], None] | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            if self.on_reject is not None:
                self.on_reject("body_too_large")
            await _send_json(
                send,
                413,
                error_body("body_too_large", f"request body is larger than {self.max_body_bytes} bytes"),
            )
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLargeError(self.max_body_bytes)
            return message

        await self.app(scope, limited_receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


async def _send_json(send: Send, status: int, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
