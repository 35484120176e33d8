"""Pure-ASGI middleware (safe with streaming responses): request id + access log, API key, body
intake (size limit, read timeout, a cap on incomplete uploads)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from contextvars import ContextVar

from pydantic import SecretStr
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.deps import api_key_matches
from app.errors import BodyReadTimeoutError, BodyTooLargeError, error_body
from app.logs import request_id_var

logger = logging.getLogger("app.access")

request_start_var: ContextVar[float | None] = ContextVar("lightvlm_request_start", default=None)
_id_from_client_var: ContextVar[bool] = ContextVar("lightvlm_request_id_from_client", default=False)
_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})
# Open without the API key: the probes and the playground page (it sends the key itself).
PUBLIC_PATHS = _PROBE_PATHS | {"/"}
DOCS_PATHS = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
# The playground's files, sample scenes and config: the page must load to ask for the key.
PUBLIC_PREFIXES = ("/static/", "/playground/")


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


class ApiKeyMiddleware:
    """With an API key configured: 401 before anything reads the body, on every route but the
    probes and the playground page (and the docs when `protect_docs` is off). CORS preflights pass:
    browsers send them without credentials."""

    def __init__(
        self,
        app: ASGIApp,
        api_key: SecretStr | None,
        protect_docs: bool = True,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.app, self.api_key, self.on_reject = app, api_key, on_reject
        self.public = PUBLIC_PATHS if protect_docs else PUBLIC_PATHS | DOCS_PATHS

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.api_key is None
            or scope.get("method") == "OPTIONS"
            or scope.get("path") in self.public
            or str(scope.get("path", "")).startswith(PUBLIC_PREFIXES)
            or api_key_matches(_header(scope, b"authorization") or "", self.api_key)
        ):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject("unauthorized")
        body = error_body("unauthorized", "missing or invalid API key")
        await _answer_early(receive, send, 401, body, [(b"www-authenticate", b"Bearer")])


DISCARD_LIMIT_BYTES = 64 * 1024 * 1024
DISCARD_TIMEOUT_S = 5.0


async def _answer_early(
    receive: Receive, send: Send, status: int, body: dict, extra_headers: list[tuple[bytes, bytes]] = ()
) -> None:
    """An answer given before the request body is read (401, 413, 429). It goes out at once; then,
    as nginx's lingering close does, what the client is still sending is read and dropped (never
    parsed, never kept) before the connection closes: a socket closed with unread data is reset by
    the kernel, and a client still uploading (httpx, requests) then gets a connection error instead
    of the answer. Bounded in bytes and time; past either, the connection closes anyway."""
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"connection", b"close"),  # the body was not read: the connection cannot carry another request
        *extra_headers,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": True})
    await _discard_body(receive)
    await send({"type": "http.response.body", "body": b""})


async def _discard_body(receive: Receive) -> None:
    received = 0
    try:
        async with asyncio.timeout(DISCARD_TIMEOUT_S):
            while received < DISCARD_LIMIT_BYTES:
                message = await receive()
                if message["type"] != "http.request":
                    return
                received += len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


class BodySizeLimitMiddleware:
    """Body intake: 413 for bodies over `max_body_bytes` (at once from Content-Length, else while
    reading); 408 when the whole body has not arrived `read_timeout_s` after the request did (a
    trickling client); 429 when `max_incomplete_uploads` bodies are being received already."""

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        on_reject: Callable[[str], None] | None = None,
        read_timeout_s: float | None = None,
        max_incomplete_uploads: int | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_reject = on_reject
        self.read_timeout_s = read_timeout_s
        self.max_incomplete_uploads = max_incomplete_uploads
        self.incomplete_uploads = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            self._reject("body_too_large")
            message = f"request body is larger than {self.max_body_bytes} bytes"
            await _answer_early(receive, send, 413, error_body("body_too_large", message))
            return
        expects_body = (length is not None and int(length) > 0) or _header(scope, b"transfer-encoding") is not None
        if not expects_body:
            await self.app(scope, receive, send)
            return
        if self.max_incomplete_uploads is not None and self.incomplete_uploads >= self.max_incomplete_uploads:
            self._reject("too_many_uploads")
            message = f"{self.incomplete_uploads} uploads are in progress already; retry shortly"
            await _answer_early(receive, send, 429, error_body("too_many_uploads", message), [(b"retry-after", b"1")])
            return
        await self._intake(scope, receive, send)

    async def _intake(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.incomplete_uploads += 1
        incomplete, received = True, 0
        deadline = time.monotonic() + (self.read_timeout_s or 0.0)

        def upload_ended() -> None:
            nonlocal incomplete
            if incomplete:
                incomplete = False
                self.incomplete_uploads -= 1

        async def limited_receive() -> Message:
            nonlocal received
            if incomplete and self.read_timeout_s is not None:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    upload_ended()
                    raise BodyReadTimeoutError(self.read_timeout_s) from None
            else:
                message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    upload_ended()
                    raise BodyTooLargeError(self.max_body_bytes)
                if not message.get("more_body", False):
                    upload_ended()
            else:  # http.disconnect
                upload_ended()
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            upload_ended()

    def _reject(self, reason: str) -> None:
        if self.on_reject is not None:
            self.on_reject(reason)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
