"""Every error leaves the service as JSON `{"error": {"type", "message"}}` with a fitting status."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lightvlm_core.errors import LightVLMError

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 1
CLIENT_ABORTED = "client_aborted"  # lightvlm_requests_rejected_total{reason=...} of aborted uploads
CLIENT_CLOSED_REQUEST = 499  # nginx's status for it: what the access log shows

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
    408: "timeout",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    429: "queue_full",
    503: "not_ready",
}


class ServiceError(Exception):
    """An error the HTTP layer raises itself (auth, readiness, unsupported fields, ...).

    `param` and `code` follow OpenAI's error object (e.g. param="tools", code="unsupported_parameter")."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers
        self.param, self.code = param, code


class BodyTooLargeError(StarletteHTTPException):
    """Raised while reading a body past the limit (an HTTPException so FastAPI lets it through)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than {limit} bytes")


class BodyReadTimeoutError(StarletteHTTPException):
    """The client did not send its whole body in time (a trickling upload): 408, connection closed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body was not received within {timeout_s:g}s", {"Connection": "close"})


def not_ready(message: str | None = None) -> ServiceError:
    return ServiceError(
        503, "not_ready", message or "the model is not loaded yet", {"Retry-After": str(RETRY_AFTER_S)}
    )


def error_body(error_type: str, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"type": error_type, "message": message}
    if param is not None or code is not None:
        error.update(param=param, code=code)
    return {"error": error}


def error_response(
    request: Request | None,
    status: int,
    error_type: str,
    message: str,
    headers: Mapping[str, str] | None = None,
    **openai_fields: str | None,
) -> JSONResponse:
    if request is not None and (400 <= status < 500 or status == 503):
        count_rejection(request, error_type)
    return JSONResponse(error_body(error_type, message, **openai_fields), status_code=status, headers=headers)


def count_rejection(request: Request, reason: str) -> None:
    service = getattr(request.app.state, "service", None)
    if service is not None:
        service.metrics.reject(reason)


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
    return error_response(
        request, exc.status, exc.error_type, exc.message, exc.headers, param=exc.param, code=exc.code
    )


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


async def _client_aborted(request: Request, exc: Exception) -> Response:
    # The client closed the connection before sending its whole body: nobody reads an answer and
    # nothing failed here. Info level, counted under its own reason, never a 5xx.
    logger.info("client closed the connection before sending its whole body (%s %s)", request.method, request.url.path)
    count_rejection(request, CLIENT_ABORTED)
    return Response(status_code=CLIENT_CLOSED_REQUEST, headers={"Connection": "close"})


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(request, 500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(LightVLMError, _engine_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(ClientDisconnect, _client_aborted)
    app.add_exception_handler(Exception, _unexpected_error)
