"""Every error leaves the service as JSON `{"error": {"type", "message"}}` with a fitting status."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lightvlm_core.errors import LightVLMError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1

# error type -> HTTP status, for the engine's and the scheduler's typed errors
STATUS_OF_ERROR_TYPE = {
    "invalid_request": 422,
    "invalid_image": 400,
    "context_length_exceeded": 400,
    "unauthorized": 401,
    "not_found": 404,
    "body_too_large": 413,
    "unsupported_media_type": 415,
    "queue_full": 429,
    "not_ready": 503,
    "out_of_memory": 503,  # the device ran out of memory mid-batch: transient, retry
    "timeout": 504,
}
_TYPE_OF_STATUS = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    503: "not_ready",
}


class ServiceError(Exception):
    """An error the HTTP layer raises itself (auth, readiness, unsupported fields, ...)."""

    def __init__(
        self, status: int, error_type: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers


class BodyTooLargeError(StarletteHTTPException):
    """Raised while reading a body past the limit (an HTTPException so FastAPI lets it through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


def not_ready(message: str | None = None) -> ServiceError:
    return ServiceError(
        503, "not_ready", message or "the model is not loaded yet", {"Retry-After": str(RETRY_AFTER_S)}
    )


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"error": {"type": error_type, "message": message}}


def error_response(
    request: Request | None,
    status: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if request is not None and (400 <= status < 500 or status == 503):
        service = getattr(request.app.state, "service", None)
        if service is not None:
            service.metrics.reject(error_type)
    return JSONResponse(error_body(error_type, message), status_code=status, headers=headers)


def status_of(exc: LightVLMError) -> int:
    return STATUS_OF_ERROR_TYPE.get(exc.error_type, 500)


def validation_message(errors: Sequence[Any]) -> str:
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "form"))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(request, exc.status, exc.error_type, exc.message, exc.headers)


async def _engine_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LightVLMError)
    status = status_of(exc)
    headers = {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None
    if status >= 500 and status != 503:
        logger.error("request failed: %s: %s", exc.error_type, exc)
    return error_response(request, status, exc.error_type, str(exc), headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(request, 422, "invalid_request", validation_message(exc.errors()))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    error_type = _TYPE_OF_STATUS.get(exc.status_code, "internal_error" if exc.status_code >= 500 else "error")
    return error_response(request, exc.status_code, error_type, str(exc.detail), exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(request, 500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(LightVLMError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected_error)
