"""Server-sent events and client-disconnect handling for generation streams."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from lightvlm_core.types import DoneEvent, ErrorEvent, Event, GenerationResult, TokenEvent

if TYPE_CHECKING:  # only in annotations: the stream type lives where the engine client does
    from lightvlm_core.client import RequestStream

SSE_DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


def sse_data(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def event_payload(event: Event) -> dict[str, Any]:
    """The /generate SSE event for an engine event (see ARCHITECTURE.md, HTTP API)."""
    if isinstance(event, TokenEvent):
        payload: dict[str, Any] = {
            "type": "token", "index": event.index, "token_id": event.token_id, "text": event.text
        }
        if event.logprob is not None:  # asked for with logprobs / top_logprobs
            payload["logprob"] = event.logprob.logprob
            payload["top_logprobs"] = [{"token": t.token, "logprob": t.logprob} for t in event.top_logprobs]
        return payload
    if isinstance(event, DoneEvent):
        return {
            "type": "done",
            "finish_reason": event.finish_reason,
            "usage": event.usage.to_dict(),
            "timings": event.timings.to_dict(),
            **({"kept_patches": [asdict(k) for k in event.kept_patches]} if event.kept_patches else {}),
        }
    assert isinstance(event, ErrorEvent)
    return {"type": "error", "error_type": event.error_type, "message": event.message}


class EventStreamResponse(StreamingResponse):
    """text/event-stream that always runs `on_close` when the response ends, however it ends
    (finished, client gone, server shutdown): the stream's request is then cancelled."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterable[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def collect_until_disconnect(request: Request, stream: RequestStream) -> GenerationResult:
    """Non-streaming: wait for the result, cancelling the request if the client goes away."""
    return await until_disconnect(request, stream.collect(), [stream])


async def until_disconnect(request: Request, work: Awaitable[T], streams: Sequence[RequestStream]) -> T:
    """Await `work` (which consumes `streams`), cancelling the streams if the client goes away."""

    def cancel_all() -> None:
        for stream in streams:
            stream.cancel()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        cancel_all()

    watcher = asyncio.create_task(watch())
    try:
        return await work
    finally:
        watcher.cancel()
        cancel_all()
