"""Request, result and event types shared by the engine, the scheduler and the service.

These are plain values: the engine fills them in, the scheduler passes them along, and the
HTTP layer serialises them. Nothing here knows about torch or HTTP.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Literal

from PIL import Image

from lightvlm_core.kv.registry import kv_policy_names  # noqa: F401  (the valid names, torch-free)
from lightvlm_core.reduction.registry import preset_names  # noqa: F401

FinishReason = Literal["stop", "length", "cancelled", "error"]
MIN_TEMPERATURE = 1e-5  # below: greedy (logits / temperature would overflow)
MIN_TOP_P = 1e-6  # below: rounds to 0 in float32
MAX_TOP_LOGPROBS = 20  # as the OpenAI API
MIN_KV_BUDGET = 16  # below: sinks + recent window + compaction interval leave nothing to rank


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. `temperature == 0` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # return the sampled token's log-probability with each token
    top_logprobs: int = 0  # also the N most likely tokens at each position (0..MAX_TOP_LOGPROBS)

    def __post_init__(self) -> None:
        from lightvlm_core.errors import InvalidRequestError

        if self.max_new_tokens < 1:
            raise InvalidRequestError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequestError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {self.top_logprobs}")
        if self.top_logprobs:
            self.logprobs = True
        self.stop = tuple(s for s in self.stop if s)

    @property
    def greedy(self) -> bool:
        # logits / a temperature this small overflow: it means greedy
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


@dataclass
class AccelerationConfig:
    """LightVLM knobs for one request.

    preset: a LightVLM preset or a reduction method: one of `preset_names()` (the registry).
    keep_ratio: the final fraction of each image's tokens kept (0 < r <= 1; 1 = no reduction).
    kv_budget: decode-time KV budget in entries per layer (None or 0: off).
    schedule: custom pyramid stages ((layer, keep_ratio), ...); a layer < 1 is a fraction of depth.
    kv_policy: the KV eviction policy, one of `kv_policy_names()` (None: the default).
    """

    preset: str = "none"
    keep_ratio: float | None = None
    kv_budget: int | None = None
    schedule: tuple[tuple[float, float], ...] | None = None  # custom (layer, keep) stages
    kv_policy: str | None = None


@dataclass
class GenerationRequest:
    """One request: a prompt with zero or more (already decoded) images.

    `messages` (optional) is a whole conversation in the Hugging Face chat format, content parts
    {"type": "text", "text": ...} and {"type": "image"} (one per entry of `images`, in order); it
    replaces the single user turn built from `prompt` (images first, then the text).
    """

    prompt: str
    images: list[Image.Image] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    acceleration: AccelerationConfig | None = None  # None: the engine's default
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    arrival_time: float = field(default_factory=time.monotonic)  # for queue_ms / ttft_ms
    messages: list[dict] | None = None
    return_kept_patches: bool = False  # report which image patches each reduction stage kept


@dataclass
class KeptPatches:
    """Which tokens of one image survived one reduction stage (for the playground's overlay)."""

    image: int  # the image's index in the request
    stage: int  # 0: before the LLM (pre-LLM reducers), then 1, 2, ... per in-LLM cut
    layer: int  # the first LLM layer that sees this set (0 for pre-LLM)
    grid: tuple[int, int]  # (rows, cols) of the image's token grid as the LLM receives it
    indices: list[int]  # kept cells of that grid, row-major, ascending


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    image_tokens: int = 0
    image_tokens_kept: int = 0  # after the last merging stage
    image_kept_fraction_layer_avg: float = 1.0  # image tokens kept, averaged over LLM layers
    kv_cache_bytes: int = 0  # held by this request's KV cache (peak over its life)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Timings:
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    tokens_per_second: float = 0.0

    def to_dict(self) -> dict:
        return {k: round(v, 3) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class TokenLogprob:
    """A token's text (as the tokenizer spells that one token) and its log-probability."""

    token: str
    logprob: float


@dataclass
class TokenEvent:
    """One generated token. `text` is the newly printable text (may be "" mid-character).

    With `SamplingParams.logprobs`, `logprob` is the sampled token's log-probability (under the
    model's distribution before temperature/top-k/top-p) and `top_logprobs` the most likely
    `SamplingParams.top_logprobs` tokens at that position, most likely first."""

    index: int
    token_id: int
    text: str
    type: Literal["token"] = "token"
    logprob: TokenLogprob | None = None
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class DoneEvent:
    finish_reason: FinishReason
    usage: Usage
    timings: Timings
    type: Literal["done"] = "done"
    kept_patches: list[KeptPatches] | None = None  # with GenerationRequest.return_kept_patches


@dataclass
class ErrorEvent:
    error_type: str  # e.g. "invalid_request", "internal_error", "timeout"
    message: str
    type: Literal["error"] = "error"


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass
class GenerationResult:
    """A finished generation, as returned by the non-streaming APIs."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    usage: Usage
    timings: Timings

    def to_dict(self) -> dict:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
            "timings": self.timings.to_dict(),
        }


# The words a LIGHTVLM_* switch takes for on and off (also runtime_env.switched_on / switched_off).
ON_WORDS = ("1", "true", "yes", "on")
OFF_WORDS = ("0", "false", "no", "off")


def auto_switch(value: str | None, name: str) -> str:
    """An `auto`-by-default LIGHTVLM_* switch read as "auto", "true" or "false"; anything else is a
    ValueError naming the setting. Here because both read it: the service's settings (which import
    only the core's public modules) and the engine (packed_weights.py)."""
    word = (value or "auto").strip().lower()
    if word in ON_WORDS:
        return "true"
    if word in OFF_WORDS:
        return "false"
    if word not in ("", "auto"):
        raise ValueError(f"{name} must be auto, true or false, not {value!r}")
    return "auto"
