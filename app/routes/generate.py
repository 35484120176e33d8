"""POST /generate: image + prompt -> SSE token stream, or one JSON object."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from app.deps import ServiceDep, require_api_key
from app.errors import ServiceError
from app.images import decode_image_bytes, decode_image_string
from app.middleware import generation_request_id, request_start
from app.schemas import ErrorResponse, GenerateRequest, GenerateResponse
from app.service import Service
from app.sse import SSE_DONE, EventStreamResponse, collect_until_disconnect, event_payload, sse_data
from lightvlm_core.errors import ImageError
from lightvlm_core.scheduler import RequestStream
from lightvlm_core.types import GenerationRequest, SamplingParams

DEFAULT_MAX_NEW_TOKENS = 256
_ACCELERATION_FORM_FIELDS = ("preset", "keep_ratio", "kv_budget")

router = APIRouter(tags=["generate"], dependencies=[Depends(require_api_key)])

_BODY_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["prompt"],
                    "properties": {
                        "prompt": {"type": "string"},
                        "image": {"type": "string", "format": "binary"},
                        "stop": {"type": "array", "items": {"type": "string"}},
                        "acceleration": {
                            "type": "string",
                            "description": "JSON object, or use preset/keep_ratio/kv_budget",
                        },
                    },
                    "additionalProperties": True,
                }
            },
        },
    }
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": GenerateResponse, "content": {"text/event-stream": {}}},
    **{code: {"model": ErrorResponse} for code in (400, 401, 413, 422, 429, 503)},
}


@router.post("/generate", openapi_extra=_BODY_DOC, responses=_RESPONSES, response_model=None)
async def generate(request: Request, service: ServiceDep) -> Response:
    """Generate text for a prompt and an optional image (JSON or multipart body)."""
    scheduler = service.require_scheduler()
    arrival = request_start()
    body, image_bytes = await read_body(request, service)
    generation = await build_request(body, image_bytes, service, arrival)
    stream = await scheduler.submit(generation)
    if body.stream:
        return EventStreamResponse(sse_events(stream), on_close=stream.cancel)
    result = await collect_until_disconnect(request, stream)
    return JSONResponse({"request_id": stream.request_id, **result.to_dict()})


async def sse_events(stream: RequestStream) -> AsyncIterator[bytes]:
    async for event in stream:
        yield sse_data(event_payload(event))
    yield SSE_DONE


async def read_body(request: Request, service: Service) -> tuple[GenerateRequest, bytes | None]:
    """Parse a JSON or multipart/form-data body into a GenerateRequest (+ uploaded image bytes)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    image_bytes = None
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        limits = service.settings
        async with request.form(max_files=1, max_fields=64, max_part_size=limits.max_body_bytes) as form:
            data: dict[str, Any] = {}
            for key, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if key != "image":
                        raise ServiceError(422, "invalid_request", f"unexpected file field {key!r}")
                    image_bytes = await value.read(limits.max_image_bytes + 1)
                    if len(image_bytes) > limits.max_image_bytes:
                        raise ImageError(f"image is larger than {limits.max_image_bytes} bytes")
                elif key == "stop":
                    data.setdefault("stop", []).append(value)
                elif key == "acceleration":
                    data[key] = _json_field(key, value)
                elif key in _ACCELERATION_FORM_FIELDS:
                    acceleration = data.setdefault("acceleration", {})
                    if not isinstance(acceleration, dict):
                        raise ServiceError(422, "invalid_request", "acceleration must be a JSON object")
                    acceleration[key] = value
                else:
                    data[key] = value
    elif content_type == "application/json":
        raw = await request.body()
        try:
            data = json.loads(raw) if raw else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServiceError(422, "invalid_request", "the body is not valid JSON") from None
        if not isinstance(data, dict):
            raise ServiceError(422, "invalid_request", "the body must be a JSON object")
    else:
        raise ServiceError(415, "unsupported_media_type", "send application/json or multipart/form-data")
    try:
        return GenerateRequest.model_validate(data), image_bytes
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def build_request(
    body: GenerateRequest, image_bytes: bytes | None, service: Service, arrival: float
) -> GenerationRequest:
    settings = service.settings
    if len(body.prompt) > settings.max_prompt_chars:
        raise ServiceError(
            422, "invalid_request", f"prompt is longer than {settings.max_prompt_chars} characters"
        )
    max_new_tokens = body.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens)
    if max_new_tokens > settings.max_new_tokens:
        raise ServiceError(422, "invalid_request", f"max_new_tokens must be <= {settings.max_new_tokens}")
    if image_bytes is not None and body.image is not None:
        raise ServiceError(422, "invalid_request", "send the image either as a file or as a field, not both")
    images = []
    if image_bytes is not None or body.image is not None:
        if settings.max_images_per_request < 1:
            raise ServiceError(422, "invalid_request", "this server does not accept images")
        if image_bytes is not None:
            images.append(
                await run_in_threadpool(
                    decode_image_bytes,
                    image_bytes,
                    max_pixels=settings.max_image_pixels,
                    max_aspect_ratio=settings.max_image_aspect_ratio,
                )
            )
        else:
            images.append(
                await run_in_threadpool(
                    decode_image_string,
                    body.image,
                    max_bytes=settings.max_image_bytes,
                    max_pixels=settings.max_image_pixels,
                    max_aspect_ratio=settings.max_image_aspect_ratio,
                )
            )
    sampling = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
        ignore_eos=body.ignore_eos,
    )
    acc = body.acceleration
    acceleration = (
        None if acc is None else service.acceleration_for(acc.preset, acc.keep_ratio, acc.kv_budget)
    )
    return GenerationRequest(
        prompt=body.prompt,
        images=images,
        sampling=sampling,
        acceleration=acceleration,
        request_id=generation_request_id(),
        arrival_time=arrival,
    )


def _json_field(key: str, value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        raise ServiceError(422, "invalid_request", f"form field {key!r} must be JSON") from None
