"""The one request-building path of /generate and /v1/chat/completions.

Each route turns its body into an `Intake` (a prompt or a chat, image sources, sampling fields);
`build_request` then applies the same limits and defaults to both: prompt size (messages count
towards it even when empty), stop strings, images, max_new_tokens, a KV budget no larger than the
model's context. It decodes the images under the service's pixel budget and returns one
GenerationRequest per choice. Work proportional to the body's size (JSON parsing, validation,
base64 and image decoding) runs in worker threads, never on the event loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError

from app.errors import ServiceError
from app.images import NO_PIXELS, PixelBudget, PixelLease, ProbedImage, image_string_to_bytes, load_image, probe_image
from app.metrics import UsageReportingStream
from app.middleware import generation_request_id
from app.schemas import (
    MAX_CONTENT_PARTS,
    MAX_MESSAGES,
    MAX_SEED,
    MAX_STOP_STRINGS,
    AccelerationOverride,
    ChatCompletionRequest,
    ChatMessage,
    ImagePart,
)
from app.settings import Settings
from lightvlm_core.types import GenerationRequest, SamplingParams, Usage

if TYPE_CHECKING:  # only in annotations
    from app.service import Service
    from lightvlm_core.client import RequestStream

DEFAULT_MAX_NEW_TOKENS = 256
# What a chat message costs the prompt budget beyond its text (the template's role markers):
# without it 150,000 empty messages would count as 0 characters.
MESSAGE_OVERHEAD_CHARS = 16
# Bodies above this are parsed and validated in a worker thread (the event loop serves /health).
PARSE_IN_THREAD_BYTES = 16 * 1024
# json.loads holds the GIL for its whole run (0.24 s for 1.6 MB on a loaded 2-core box): twelve at
# once in twelve threads froze the event loop for 3.4 s. One at a time, the loop runs between them.
_ONE_BIG_PARSE_AT_A_TIME = threading.Lock()

Model = TypeVar("Model", bound=BaseModel)


@dataclass
class Intake:
    """A request as either route received it, before the shared limits and defaults."""

    prompt: str
    images: list[str | bytes]  # base64 / data: URL strings, or an uploaded file's bytes
    max_new_tokens: int | None
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    ignore_eos: bool
    acceleration: AccelerationOverride | None
    messages: list[dict] | None = None  # a chat in the Hugging Face format (see GenerationRequest)
    logprobs: bool = False
    top_logprobs: int = 0
    n: int = 1
    return_kept_patches: bool = False

    def prompt_chars(self) -> int:
        return len(self.prompt) + MESSAGE_OVERHEAD_CHARS * len(self.messages or ())


@dataclass
class BuiltRequest:
    """One GenerationRequest per choice; they share the images, whose pixels `lease` holds
    until the route calls `release()` (when the response has ended)."""

    request_id: str
    choices: list[GenerationRequest]
    lease: PixelLease = field(default=NO_PIXELS)

    def release(self) -> None:
        self.lease.release()


# ---- bodies ------------------------------------------------------------------------------------


def loads_json(raw: bytes | str, what: str = "the body") -> Any:
    """json.loads whose every failure is a 422: syntax, invalid UTF-8 (ValueError), an integer
    over Python's digit limit (ValueError), nesting deeper than the recursion limit."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else "not valid JSON"
        raise ServiceError(422, "invalid_request", f"{what} is {reason}") from None


def validate(model: type[Model], data: Any) -> Model:
    if not isinstance(data, dict):
        raise ServiceError(422, "invalid_request", "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


async def parse_json_body(
    raw: bytes, model: type[Model], check: Callable[[dict[str, Any]], None] | None = None
) -> Model:
    """Parse and validate a JSON body (`check` sees the raw object first), off the event loop
    when it is large."""

    def parse() -> Model:
        with _ONE_BIG_PARSE_AT_A_TIME if len(raw) > PARSE_IN_THREAD_BYTES else contextlib.nullcontext():
            data = loads_json(raw) if raw else {}
        if isinstance(data, dict):
            check_list_sizes(data)
            if check is not None:
                check(data)
        return validate(model, data)

    return await run_in_threadpool(parse) if len(raw) > PARSE_IN_THREAD_BYTES else parse()


def check_list_sizes(data: dict[str, Any]) -> None:
    """The list caps, checked on the raw object before validation: validating 150,000 messages
    would hold the GIL (and so the event loop and /health) for as long as it takes to refuse them."""
    caps = {"messages": MAX_MESSAGES, "stop": MAX_STOP_STRINGS}
    for name, cap in caps.items():
        value = data.get(name)
        if isinstance(value, list) and len(value) > cap:
            raise ServiceError(422, "invalid_request", f"{name}: at most {cap} items, got {len(value)}")
    messages = data.get("messages")
    for message in messages if isinstance(messages, list) else ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and len(content) > MAX_CONTENT_PARTS:
            raise ServiceError(
                422, "invalid_request", f"messages.content: at most {MAX_CONTENT_PARTS} parts, got {len(content)}"
            )


# ---- OpenAI chat -------------------------------------------------------------------------------

# Parameters of OpenAI's API that this server does not implement -> the values that mean "off"
# (accepted). Anything else is a 400, as OpenAI answers a parameter a model does not support.
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0),
    "presence_penalty": (None, 0),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
}
# Accepted and ignored: bookkeeping that does not change the answer.
_IGNORED = frozenset(
    {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "safety_identifier", "prompt_cache_key"}
)


def check_openai_params(data: dict[str, Any]) -> None:
    """400 (OpenAI's error object, with `param` and `code`) for what we do not implement."""
    for name, value in data.items():
        if name in _UNSUPPORTED_UNLESS:
            if value not in _UNSUPPORTED_UNLESS[name]:
                raise ServiceError(
                    400, "invalid_request", f"{name!r} is not supported by this server",
                    param=name, code="unsupported_parameter",
                )  # fmt: skip
        elif name not in ChatCompletionRequest.model_fields and name not in _IGNORED:
            raise ServiceError(
                400, "invalid_request", f"unrecognized request argument: {name!r}",
                param=name, code="unrecognized_argument",
            )  # fmt: skip
    if data.get("top_logprobs") is not None and data.get("logprobs") is not True:
        raise ServiceError(
            400, "invalid_request", "top_logprobs needs logprobs=true", param="top_logprobs", code="invalid_value"
        )


def chat_intake(body: ChatCompletionRequest) -> Intake:
    chat, prompt, image_urls = to_chat_messages(body.messages)
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return Intake(
        prompt=prompt,
        messages=chat,
        images=list(image_urls),
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=stop,
        ignore_eos=body.ignore_eos,
        acceleration=body.acceleration,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs or 0,
        n=body.n,
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


# ---- the shared path ---------------------------------------------------------------------------


async def build_request(intake: Intake, service: Service, budget: PixelBudget, arrival: float) -> BuiltRequest:
    """Apply the service's limits and defaults; decode the images; one request per choice."""
    max_new_tokens = check_limits(intake, service)
    images, lease = await decode_images(intake.images, service, budget)
    try:
        acc = intake.acceleration
        acceleration = None if acc is None else service.acceleration_for(acc.preset, acc.keep_ratio, acc.kv_budget)
        if acceleration is not None and acc.kv_policy is not None:
            acceleration = dataclasses.replace(acceleration, kv_policy=acc.kv_policy)
        request_id = generation_request_id()
        choices = [
            GenerationRequest(
                prompt=intake.prompt,
                messages=intake.messages,
                images=images,
                sampling=sampling_params(intake, max_new_tokens, choice),
                acceleration=acceleration,
                return_kept_patches=intake.return_kept_patches,
                request_id=request_id if intake.n == 1 else f"{request_id}-{choice}",
                arrival_time=arrival,
            )
            for choice in range(intake.n)
        ]
    except BaseException:
        lease.release()
        raise
    return BuiltRequest(request_id, choices, lease)


def check_limits(intake: Intake, service: Service) -> int:
    """The limits every route shares; returns the request's max_new_tokens."""
    settings = service.settings
    if intake.prompt_chars() > settings.max_prompt_chars:
        raise ServiceError(422, "invalid_request", f"the prompt is longer than {settings.max_prompt_chars} characters")
    if len(intake.images) > settings.max_images_per_request:
        limit = settings.max_images_per_request
        message = f"at most {limit} images per request" if limit else "this server does not accept images"
        raise ServiceError(422, "invalid_request", message)
    max_new_tokens = intake.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, settings.max_new_tokens)
    if max_new_tokens > settings.max_new_tokens:
        raise ServiceError(422, "invalid_request", f"max_new_tokens must be <= {settings.max_new_tokens}")
    kv_budget = intake.acceleration.kv_budget if intake.acceleration is not None else None
    max_context = service.info.max_context if service.info is not None else None
    if kv_budget and max_context and kv_budget > max_context:
        raise ServiceError(
            422, "invalid_request", f"acceleration.kv_budget must be <= the model's context ({max_context})"
        )
    return max_new_tokens


def sampling_params(intake: Intake, max_new_tokens: int, choice: int) -> SamplingParams:
    """Choice i of a seeded request samples with seed + i (greedy choices are all the same)."""
    seed = None if intake.seed is None else (intake.seed + choice) % (MAX_SEED + 1)
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=intake.temperature,
        top_p=intake.top_p,
        top_k=intake.top_k,
        seed=seed,
        stop=tuple(intake.stop),
        ignore_eos=intake.ignore_eos,
        logprobs=intake.logprobs or intake.top_logprobs > 0,
        top_logprobs=intake.top_logprobs,
    )


async def decode_images(
    sources: list[str | bytes], service: Service, budget: PixelBudget
) -> tuple[list[Image.Image], PixelLease]:
    """Check every image's header, take a lease on all their pixels at once, then decode."""
    if not sources:
        return [], NO_PIXELS
    settings = service.settings
    started = time.perf_counter()
    probed = await run_in_threadpool(probe_images, sources, settings)
    probe_s = (time.perf_counter() - started) / len(probed)
    lease = await budget.acquire(sum(p.pixels for p in probed), settings.request_timeout_s)
    try:
        images = []
        for image in probed:
            started = time.perf_counter()
            images.append(await run_in_threadpool(load_image, image))
            service.metrics.observe_image_preprocess(probe_s + time.perf_counter() - started)
        return images, lease
    except BaseException:
        lease.release()
        raise


def probe_images(sources: list[str | bytes], settings: Settings) -> list[ProbedImage]:
    probed = []
    for source in sources:
        max_bytes = settings.max_image_bytes
        data = source if isinstance(source, bytes) else image_string_to_bytes(source, max_bytes=max_bytes)
        probed.append(
            probe_image(data, max_pixels=settings.max_image_pixels, max_aspect_ratio=settings.max_image_aspect_ratio)
        )
    return probed


async def submit_all(
    scheduler: Any, built: BuiltRequest, on_usage: Callable[[Usage], None] | None = None
) -> list[RequestStream]:
    """Submit every choice; if one is refused (queue full, bad prompt), none stays submitted.
    With `on_usage`, each stream reports its final usage to it (the per-request metrics)."""
    streams: list[RequestStream] = []
    try:
        for choice in built.choices:
            stream = await scheduler.submit(choice)
            streams.append(stream if on_usage is None else UsageReportingStream(stream, on_usage))
    except BaseException:
        for stream in streams:
            stream.cancel()
        built.release()
        raise
    return streams
