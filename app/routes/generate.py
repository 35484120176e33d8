"""POST /generate: image + prompt -> SSE token stream, or one JSON object."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from app.deps import PixelBudgetDep, ServiceDep
from app.errors import ServiceError
from app.middleware import request_start
from app.requests import Intake, build_request, loads_json, parse_json_body, submit_all, validate
from app.schemas import ErrorResponse, GenerateRequest, GenerateResponse
from app.sse import SSE_DONE, EventStreamResponse, collect_until_disconnect, event_payload, sse_data
from lightvlm_core.errors import ImageError

if TYPE_CHECKING:  # only in annotations
    from app.service import Service
    from lightvlm_core.client import RequestStream

_ACCELERATION_FORM_FIELDS = ("preset", "keep_ratio", "kv_budget", "kv_policy")

# The API key is checked by app.middleware.ApiKeyMiddleware, before the body is read.
router = APIRouter(tags=["generate"])

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
async def generate(request: Request, service: ServiceDep, budget: PixelBudgetDep) -> Response:
    """Generate text for a prompt and an optional image (JSON or multipart body)."""
    scheduler = service.require_scheduler()
    arrival = request_start()
    body, image_bytes = await read_body(request, service)
    built = await build_request(intake_of(body, image_bytes), service, budget, arrival)
    (stream,) = await submit_all(scheduler, built, service.metrics.observe_usage)
    if body.stream:

        def on_close() -> None:
            stream.cancel()
            built.release()

        return EventStreamResponse(sse_events(stream), on_close=on_close)
    try:
        result = await collect_until_disconnect(request, stream)
    finally:
        built.release()
    return JSONResponse({"request_id": stream.request_id, **result.to_dict()})


async def sse_events(stream: RequestStream) -> AsyncIterator[bytes]:
    async for event in stream:
        yield sse_data(event_payload(event))
    yield SSE_DONE


def intake_of(body: GenerateRequest, image_bytes: bytes | None) -> Intake:
    if image_bytes is not None and body.image is not None:
        raise ServiceError(422, "invalid_request", "send the image either as a file or as a field, not both")
    image = image_bytes if image_bytes is not None else body.image
    return Intake(
        prompt=body.prompt,
        images=[] if image is None else [image],
        max_new_tokens=body.max_new_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop,
        ignore_eos=body.ignore_eos,
        acceleration=body.acceleration,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs,
        return_kept_patches=body.return_kept_patches,
    )


async def read_body(request: Request, service: Service) -> tuple[GenerateRequest, bytes | None]:
    """Parse a JSON or multipart/form-data body into a GenerateRequest (+ uploaded image bytes)."""
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        data, image_bytes = await read_form(request, service)
        return validate(GenerateRequest, data), image_bytes
    if content_type == "application/json":
        return await parse_json_body(await request.body(), GenerateRequest), None
    raise ServiceError(415, "unsupported_media_type", "send application/json or multipart/form-data")


async def read_form(request: Request, service: Service) -> tuple[dict[str, Any], bytes | None]:
    limits = service.settings
    image_bytes = None
    data: dict[str, Any] = {}
    async with request.form(max_files=1, max_fields=64, max_part_size=limits.max_body_bytes) as form:
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
                data[key] = loads_json(value, f"form field {key!r}")
            elif key in _ACCELERATION_FORM_FIELDS:
                acceleration = data.setdefault("acceleration", {})
                if not isinstance(acceleration, dict):
                    raise ServiceError(422, "invalid_request", "acceleration must be a JSON object")
                acceleration[key] = value
            else:
                data[key] = value
    return data, image_bytes
