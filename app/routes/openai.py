"""OpenAI-compatible POST /v1/chat/completions and GET /v1/models (works with the `openai` client)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from app.deps import ServiceDep, require_api_key
from app.errors import ServiceError, error_body
from app.images import decode_image_string
from app.middleware import generation_request_id, request_start
from app.routes.generate import DEFAULT_MAX_NEW_TOKENS
from app.schemas import ChatCompletionRequest, ChatMessage, ErrorResponse, ImagePart
from app.service import Service
from app.sse import SSE_DONE, EventStreamResponse, collect_until_disconnect, sse_data
from lightvlm_core.scheduler import RequestStream
from lightvlm_core.types import DoneEvent, ErrorEvent, GenerationRequest, SamplingParams, TokenEvent, Usage

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_api_key)])
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 422, 429, 503)
}


@router.get("/models", responses=_ERRORS)
async def list_models(service: ServiceDep) -> dict[str, Any]:
    """The served model."""
    service.require_scheduler()
    model = {"id": service.model_name, "object": "model", "created": service.created, "owned_by": "lightvlm"}
    return {"object": "list", "data": [model]}


@router.post("/chat/completions", responses=_ERRORS, response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, service: ServiceDep) -> Response:
    """Chat completion over text and `image_url` (data: URL) content parts."""
    scheduler = service.require_scheduler()
    if body.model is not None and body.model not in service.model_names():
        raise ServiceError(404, "model_not_found", f"model {body.model!r} is not served here; see /v1/models")
    generation = await build_request(body, service, request_start())
    stream = await scheduler.submit(generation)
    completion_id, created = f"chatcmpl-{generation.request_id}", int(time.time())
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        chunks = stream_chunks(stream, completion_id, created, service.model_name, include_usage)
        return EventStreamResponse(chunks, on_close=stream.cancel)
    result = await collect_until_disconnect(request, stream)
    message = {"role": "assistant", "content": result.text}
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": _finish_reason(result.finish_reason),
        "logprobs": None,
    }
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": service.model_name,
            "choices": [choice],
            "usage": _usage(result.usage),
        }
    )


async def stream_chunks(
    stream: RequestStream, completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
        }
        if include_usage:
            payload["usage"] = None
        return sse_data(payload)

    yield chunk({"role": "assistant", "content": ""})
    async for event in stream:
        if isinstance(event, TokenEvent):
            if event.text:
                yield chunk({"content": event.text})
        elif isinstance(event, DoneEvent):
            yield chunk({}, _finish_reason(event.finish_reason))
            if include_usage:
                yield sse_data(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": model,
                        "choices": [],
                        "usage": _usage(event.usage),
                    }
                )
        elif isinstance(event, ErrorEvent):
            yield sse_data(error_body(event.error_type, event.message))
    yield SSE_DONE


async def build_request(body: ChatCompletionRequest, service: Service, arrival: float) -> GenerationRequest:
    settings = service.settings
    chat, prompt, image_urls = to_chat_messages(body.messages)
    if len(prompt) > settings.max_prompt_chars:
        raise ServiceError(
            422, "invalid_request", f"messages are longer than {settings.max_prompt_chars} characters"
        )
    if len(image_urls) > settings.max_images_per_request:
        raise ServiceError(
            422, "invalid_request", f"at most {settings.max_images_per_request} images per request"
        )
    max_new_tokens = (
        body.max_completion_tokens or body.max_tokens or min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens)
    )
    if max_new_tokens > settings.max_new_tokens:
        raise ServiceError(422, "invalid_request", f"max_tokens must be <= {settings.max_new_tokens}")
    images = [
        await run_in_threadpool(
            decode_image_string,
            url,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_image_aspect_ratio,
        )
        for url in image_urls
    ]
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(stop),
        ignore_eos=body.ignore_eos,
    )
    acc = body.acceleration
    acceleration = (
        None if acc is None else service.acceleration_for(acc.preset, acc.keep_ratio, acc.kv_budget)
    )
    return GenerationRequest(
        prompt=prompt,
        messages=chat,
        images=images,
        sampling=sampling,
        acceleration=acceleration,
        request_id=generation_request_id(),
        arrival_time=arrival,
    )


def to_chat_messages(messages: list[ChatMessage]) -> tuple[list[dict], str, list[str]]:
    """OpenAI messages -> (Hugging Face chat messages, all text, image URLs in order).

    The conversation reaches the model's own chat template as is (roles kept, each image_url
    part becoming an {"type": "image"} part), so multi-turn chats are exact.
    """
    chat: list[dict] = []
    texts: list[str] = []
    image_urls: list[str] = []
    for message in messages:
        parts: list[dict] = []
        if isinstance(message.content, str):
            parts.append({"type": "text", "text": message.content})
        for part in message.content if isinstance(message.content, list) else []:
            if isinstance(part, ImagePart):
                if message.role != "user":
                    raise ServiceError(422, "invalid_request", "images are only accepted in user messages")
                image_urls.append(part.image_url.url)
                parts.append({"type": "image"})
            else:
                parts.append({"type": "text", "text": part.text})
        texts.extend(p["text"] for p in parts if p["type"] == "text")
        role = "system" if message.role in ("system", "developer") else message.role
        chat.append({"role": role, "content": parts})
    if not chat or chat[-1]["role"] != "user":
        raise ServiceError(422, "invalid_request", "the last message must come from the user")
    return chat, "\n".join(t for t in texts if t), image_urls


def _finish_reason(reason: str) -> str:
    return reason if reason in ("stop", "length") else "stop"


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
