"""Turning a GenerationRequest into a Request the runner can execute: validation, the chat
template, tokenising and image preprocessing. Runs on worker threads of the engine process
(never on the step loop), and everything a bad request can get wrong is caught here, before it
shares a batch with anyone."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from lightvlm_core.errors import ImageError, InvalidRequestError, PromptTooLongError
from lightvlm_core.models.base import ModelAdapter, PromptInputs
from lightvlm_core.prompt_text import TextGuard
from lightvlm_core.reduction import resolve_acceleration
from lightvlm_core.reduction.cost import prefill_cost
from lightvlm_core.request import Request
from lightvlm_core.types import AccelerationConfig, GenerationRequest

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit value


@dataclass
class ModelInputs:
    """What the model runner needs of one prompt (held in `Request.prompt`)."""

    prompt: PromptInputs
    positions: torch.Tensor  # (T,) or (3, T)
    next_position: int  # position id of the first generated token
    image_spans: list[tuple[int, int]]  # [start, end) of each image span (ModelAdapter.image_spans)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.prompt.input_ids

    @property
    def vision(self) -> dict[str, torch.Tensor]:
        return self.prompt.vision

    @property
    def num_images(self) -> int:
        return self.prompt.num_images


class InputProcessor:
    """`prepare(GenerationRequest) -> Request`; raises InvalidRequestError subclasses for bad input."""

    def __init__(self, processor, adapter: ModelAdapter, eos_token_ids: frozenset[int],
                 default_acceleration: AccelerationConfig) -> None:
        self.processor = processor
        self.adapter = adapter
        self.eos_token_ids = eos_token_ids
        self.default_acceleration = default_acceleration
        self.max_context = adapter.max_context
        self.text_guard = TextGuard(getattr(processor, "tokenizer", processor), adapter.image_token_id)

    def prepare(self, request: GenerationRequest) -> Request:
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise InvalidRequestError("prompt must be a non-empty string")
        accel = resolve_acceleration(request.acceleration) if request.acceleration else self.default_acceleration
        self._check_limits(request, accel)
        images = [_checked_image(img) for img in request.images]
        if request.messages is not None:
            messages = checked_messages(request.messages, len(images))
        else:
            content = [{"type": "image"} for _ in images] + [{"type": "text", "text": request.prompt}]
            messages = [{"role": "user", "content": content}]
        messages, taken = self.text_guard.take_texts(messages)  # only the template makes control tokens
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        except Exception as exc:  # the model's own Jinja template rejected the conversation
            raise InvalidRequestError(f"the model's chat template rejected the messages: {exc}") from exc
        if taken.texts:
            text, slot_id = self.text_guard.fill_slots(text, taken)
        try:
            inputs = self.processor(images=images or None, text=[text], return_tensors="pt")
        except (ValueError, OSError, TypeError) as exc:
            raise ImageError(f"could not process the image(s): {exc}") from exc
        if taken.texts:
            inputs = self.text_guard.splice(inputs, slot_id, taken)
        input_ids = inputs["input_ids"][0]
        n = int(input_ids.shape[0])
        if n + 1 > self.max_context:
            raise PromptTooLongError(f"prompt has {n} tokens; the model's context is {self.max_context}")
        vision = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        prompt = PromptInputs(input_ids=input_ids, vision=vision, num_images=len(images))
        positions, next_position = self.adapter.position_ids(prompt)
        spans = self.adapter.image_spans(input_ids)
        sizes = [end - start for start, end in spans]
        return Request(
            request_id=request.request_id,
            num_prompt_tokens=n,
            sampling=request.sampling,
            acceleration=accel,
            arrival_time=request.arrival_time,
            max_context=self.max_context,
            eos_token_ids=self.eos_token_ids,
            num_image_tokens=sum(sizes),
            prefill_cost=prefill_cost(accel, len(self.adapter.layers), n, sizes),
            prompt=ModelInputs(prompt, positions, next_position, spans),
            return_kept_patches=request.return_kept_patches,
        )

    def _check_limits(self, request: GenerationRequest, accel: AccelerationConfig) -> None:
        """Numbers that would overflow or make no sense for this model (the API bounds them too,
        but the engine never trusts its caller)."""
        s = request.sampling
        if s.max_new_tokens > self.max_context:
            raise InvalidRequestError(f"max_new_tokens must be <= {self.max_context} (the model's context)")
        if s.seed is not None and not 0 <= s.seed <= MAX_SEED:
            raise InvalidRequestError(f"seed must be in [0, {MAX_SEED}], got {s.seed}")
        vocab = self.adapter.lm_head.weight.shape[0]
        if s.top_k > vocab:
            raise InvalidRequestError(f"top_k must be <= {vocab} (the vocabulary size), got {s.top_k}")
        if accel.kv_budget is not None and accel.kv_budget > self.max_context:
            raise InvalidRequestError(
                f"kv_budget must be <= {self.max_context} (the model's context), got {accel.kv_budget}")


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (gen_eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(int(v) for v in value)
    return frozenset(ids)


def checked_messages(messages: list[dict], num_images: int) -> list[dict]:
    """Validate a chat conversation; the number of image parts must match the images given."""
    if not messages or messages[-1].get("role") != "user":
        raise InvalidRequestError("the last message must come from the user")
    parts = 0
    for message in messages:
        if message.get("role") not in ("system", "user", "assistant"):
            raise InvalidRequestError(f"unknown message role {message.get('role')!r}")
        content = message.get("content")
        if isinstance(content, list):
            parts += sum(1 for part in content if part.get("type") == "image")
        elif not isinstance(content, str):
            raise InvalidRequestError("message content must be a string or a list of parts")
    if parts != num_images:
        raise InvalidRequestError(f"{parts} image parts in the messages but {num_images} images given")
    return messages


def _checked_image(img: object) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise ImageError(f"expected a PIL image, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise ImageError(f"image has no pixels ({img.width}x{img.height})")
    return img if img.mode == "RGB" else img.convert("RGB")
