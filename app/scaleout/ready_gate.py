"""Hold an app's ASGI lifespan startup until its model is loaded.

`create_app` loads the model in the background so that /ready can say 503 meanwhile. Ray Serve
routes traffic to a replica as soon as its lifespan startup completes, so for Ray the startup is
reported complete only once the service is ready (or failed, which fails the replica's start and
lets Ray retry it)."""

from __future__ import annotations

import asyncio
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class ReadyGate:
    def __init__(self, app: ASGIApp, service: Any, poll_s: float = 0.2) -> None:
        self.app = app
        self.service = service
        self.poll_s = poll_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def gated_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                failure = await self._wait_until_ready()
                if failure:
                    message = {"type": "lifespan.startup.failed", "message": failure}
            await send(message)

        await self.app(scope, receive, gated_send)

    async def _wait_until_ready(self) -> str | None:
        while not self.service.ready:
            if self.service.state in ("failed", "stopped"):
                return f"the model did not load (service state {self.service.state})"
            await asyncio.sleep(self.poll_s)
        return None
