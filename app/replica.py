"""`X-LightVLM-Replica` on every response: which replica (Ray Serve replica, Kubernetes pod or
plain process) served it, so a client or a load test can tell replicas behind one address apart."""

from __future__ import annotations

import os
import socket

from starlette.types import ASGIApp, Message, Receive, Scope, Send

REPLICA_HEADER = "X-LightVLM-Replica"
REPLICA_NAME_ENV = "LIGHTVLM_REPLICA_NAME"


def replica_name() -> str:
    """$LIGHTVLM_REPLICA_NAME (the Ray deployment sets it to the replica id), else the host name
    (a Kubernetes pod's name)."""
    return os.environ.get(REPLICA_NAME_ENV) or socket.gethostname()


class ReplicaHeaderMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware buffering), so SSE streams keep streaming. Inside a FastAPI
    app, a 500 from an unhandled exception is sent by Starlette's outermost error middleware,
    around this one: wrap the whole app too (the Ray deployment does) to name the replica there."""

    def __init__(self, app: ASGIApp, name: str | None = None) -> None:
        self.app = app
        self.name = name
        self._header: tuple[bytes, bytes] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self._header is None:  # read when serving starts: the Ray replica sets its name first
            self._header = (REPLICA_HEADER.lower().encode(), (self.name or replica_name()).encode("latin-1"))
        header = self._header

        async def send_with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                if not any(name == header[0] for name, _ in headers):  # idempotent when stacked
                    message = {**message, "headers": [*headers, header]}
            await send(message)

        await self.app(scope, receive, send_with_header)
