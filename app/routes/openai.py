"""OpenAI-compatible POST /v1/chat/completions and GET /v1/models (works with the `openai` client).

Requests are built by app.requests (the same limits and defaults as /generate); this module
formats OpenAI's responses: choices (`n`), streamed chunks, usage and `logprobs`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app.deps import PixelBudgetDep, ServiceDep
from app.errors import ServiceError, error_body
from app.middleware import request_start
from app.requests import BuiltRequest, build_request, chat_intake, check_openai_params, parse_json_body, submit_all
from app.schemas import ChatCompletionRequest, ErrorResponse
from app.sse import SSE_DONE, EventStreamResponse, sse_data, until_disconnect
from lightvlm_core.errors import LightVLMError
from lightvlm_core.types import DoneEvent, ErrorEvent, Event, TokenEvent, TokenLogprob, Usage

if TYPE_CHECKING:  # only in annotations: the stream type lives where the engine client does
    from lightvlm_core.client import RequestStream

# The API key is checked by app.middleware.ApiKeyMiddleware, before the body is read.
router = APIRouter(prefix="/v1", tags=["openai"])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)
}
_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
    }
}


@router.get("/models", responses=_ERRORS)
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """The served model."""
    service.require_scheduler()
    model = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "lightvlm"}
    return {"object": "list", "data": [model]}


@router.post("/chat/completions", openapi_extra=_BODY_DOC, responses=_ERRORS, response_model=None)
async def chat_completions(request: Request, service: ServiceDep, budget: PixelBudgetDep) -> Response:
    """Chat completion over text and `image_url` (data: URL) content parts."""
    scheduler = service.require_scheduler()
    arrival = request_start()
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ServiceError(415, "unsupported_media_type", "send application/json")
    body = await parse_json_body(await request.body(), ChatCompletionRequest, check=check_openai_params)
    if body.model is not None and body.model not in service.model_names():
        raise ServiceError(404, "model_not_found", f"model {body.model!r} is not served here; see /v1/models")
    built = await build_request(chat_intake(body), service, budget, arrival)
    streams = await submit_all(scheduler, built, service.metrics.observe_usage)
    header = ChunkHeader(f"chatcmpl-{built.request_id}", int(time.time()), service.model_name)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = stream_chunks(streams, header, include_usage, body.logprobs)
        return EventStreamResponse(chunks, on_close=lambda: _end(streams, built))
    try:
        choices = await until_disconnect(request, asyncio.gather(*(collect_choice(s) for s in streams)), streams)
    finally:
        built.release()
    return JSONResponse(
        {
            **header.fields("chat.completion"),
            "choices": [c.to_dict(i, body.logprobs) for i, c in enumerate(choices)],
            "usage": _usage([c.done.usage for c in choices]),
        }
    )


def _end(streams: Sequence[RequestStream], built: BuiltRequest) -> None:
    for stream in streams:
        stream.cancel()
    built.release()


@dataclass(frozen=True)
class ChunkHeader:
    id: str
    created: int
    model: str

    def fields(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


class ChoiceFailedError(LightVLMError):
    """A choice ended with an error event (time-out, engine failure, ...)."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.error_type = event.error_type


@dataclass
class Choice:
    """One finished choice of a non-streaming completion."""

    done: DoneEvent
    texts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self, index: int, with_logprobs: bool) -> dict[str, Any]:
        return {
            "index": index,
            "message": {"role": "assistant", "content": "".join(self.texts)},
            "finish_reason": _finish_reason(self.done.finish_reason),
            "logprobs": {"content": self.logprobs, "refusal": None} if with_logprobs else None,
        }


async def collect_choice(stream: RequestStream) -> Choice:
    texts: list[str] = []
    logprobs: list[dict[str, Any]] = []
    async for event in stream:
        if isinstance(event, TokenEvent):
            texts.append(event.text)
            if event.logprob is not None:
                logprobs.append(content_logprob(event))
        elif isinstance(event, ErrorEvent):
            raise ChoiceFailedError(event)
        else:
            return Choice(event, texts, logprobs)
    raise ChoiceFailedError(ErrorEvent("internal_error", "stream ended without a done event"))


def content_logprob(event: TokenEvent) -> dict[str, Any]:
    """One entry of OpenAI's `logprobs.content`: the sampled token and the most likely ones."""
    assert event.logprob is not None
    return {**_token_logprob(event.logprob), "top_logprobs": [_token_logprob(t) for t in event.top_logprobs]}


def _token_logprob(token: TokenLogprob) -> dict[str, Any]:
    # bytes: the token's UTF-8 bytes (a token may hold part of a character; OpenAI does the same)
    raw = token.token.encode("utf-8", errors="surrogateescape")
    return {"token": token.token, "logprob": token.logprob, "bytes": list(raw)}


async def stream_chunks(
    streams: Sequence[RequestStream], header: ChunkHeader, include_usage: bool, with_logprobs: bool
) -> AsyncIterator[bytes]:
    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, logprobs: Any = None) -> bytes:
        choice = {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}
        payload: dict[str, Any] = {**header.fields("chat.completion.chunk"), "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return sse_data(payload)

    for index in range(len(streams)):
        yield chunk(index, {"role": "assistant", "content": ""})
    usages: list[Usage] = []
    async for index, event in merged(streams):
        if isinstance(event, TokenEvent):
            if event.text or event.logprob is not None:
                logprobs = {"content": [content_logprob(event)], "refusal": None} if with_logprobs else None
                yield chunk(index, {"content": event.text}, logprobs=logprobs)
        elif isinstance(event, DoneEvent):
            usages.append(event.usage)
            yield chunk(index, {}, _finish_reason(event.finish_reason))
        else:
            yield sse_data(error_body(event.error_type, event.message))
            break  # the other choices are cancelled when the response closes
    else:
        if include_usage:
            yield sse_data({**header.fields("chat.completion.chunk"), "choices": [], "usage": _usage(usages)})
    yield SSE_DONE


async def merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple[int, Event]]:
    """The events of all choices as they come, each with its choice's index."""
    if len(streams) == 1:
        async for event in streams[0]:
            yield 0, event
        return
    queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for event in stream:
                queue.put_nowait((index, event))
        except Exception as exc:  # never leave the merge waiting for a choice that cannot end
            queue.put_nowait((index, ErrorEvent("internal_error", f"{type(exc).__name__}")))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(streams)
        while running:
            index, event = await queue.get()
            running -= not isinstance(event, TokenEvent)
            yield index, event
    finally:
        for task in tasks:
            task.cancel()


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _usage(usages: list[Usage]) -> dict[str, int]:
    """All choices share the prompt; their completions add up (as OpenAI counts n > 1)."""
    prompt = usages[0].prompt_tokens if usages else 0
    completion = sum(u.completion_tokens for u in usages)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
