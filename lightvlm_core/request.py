"""One Request: what moves through the engine core, from admission to its last token.

The API side sends a thin `GenerationRequest` (prompt, images, sampling, acceleration); the
runner's `prepare` turns it into a `Request` (token ids, processed vision inputs, positions); the
scheduler alone changes its status; `usage()` and `timings()` are computed here and nowhere else,
so the done event and the Prometheus histograms report the same numbers.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from lightvlm_core.types import AccelerationConfig, FinishReason, KeptPatches, SamplingParams, Timings, Usage


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    # Everything after RUNNING is a finished status.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_CANCELLED = enum.auto()
    FINISHED_ERROR = enum.auto()

    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING


FINISH_REASON: dict[RequestStatus, FinishReason] = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_CANCELLED: "cancelled",
    RequestStatus.FINISHED_ERROR: "error",
}
STATUS_OF_REASON = {reason: status for status, reason in FINISH_REASON.items()}


@dataclass
class Request:
    """A prepared request and its lifecycle.

    `prompt` holds what the model consumes (token ids and processed vision tensors: opaque to
    the scheduler); `prefill_cost` is what the step's token budget counts for its prefill: the
    tokens it runs through one LLM layer, averaged over the layers (lightvlm_core/reduction/cost.py;
    the prompt's length where no image token is reduced, and where left at 0).
    Timestamps are `time.monotonic()` seconds, comparable across processes on one machine.
    """

    request_id: str
    num_prompt_tokens: int
    sampling: SamplingParams
    acceleration: AccelerationConfig
    arrival_time: float
    max_context: int
    eos_token_ids: frozenset[int] = frozenset()
    num_image_tokens: int = 0
    prefill_cost: int = 0
    prompt: Any = None  # runner-specific (PromptInputs + positions for the model runner)
    return_kept_patches: bool = False
    status: RequestStatus = RequestStatus.WAITING
    num_computed_layers: int = 0  # prefill progress: layers scheduled so far (layer-sliced prefill)
    output_token_ids: list[int] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (error_type, message) when FINISHED_ERROR
    # timestamps
    scheduled_time: float | None = None  # its prefill began
    first_token_time: float | None = None  # its first token was sampled (prefill done)
    last_token_time: float | None = None
    finished_time: float | None = None
    # reported by the runner at prefill
    image_tokens_kept: int = 0
    image_kept_fraction_layer_avg: float = 1.0
    kv_cache_bytes: int = 0  # peak over its life
    kept_patches: list[KeptPatches] | None = None

    def __post_init__(self) -> None:
        if self.prefill_cost <= 0:
            self.prefill_cost = self.num_prompt_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished()

    @property
    def finish_reason(self) -> FinishReason | None:
        return FINISH_REASON.get(self.status)

    def append_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        if self.first_token_time is None:
            self.first_token_time = now
        self.last_token_time = now

    def stop_reason(self) -> RequestStatus | None:
        """Whether the last token ends the request: EOS, max_new_tokens or the context."""
        if not self.output_token_ids:
            return None
        if self.output_token_ids[-1] in self.eos_token_ids and not self.sampling.ignore_eos:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.sampling.max_new_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.num_prompt_tokens + self.num_output_tokens >= self.max_context:
            return RequestStatus.FINISHED_LENGTH
        return None

    def finish(self, status: RequestStatus, now: float, error: tuple[str, str] | None = None) -> None:
        self.status = status
        self.finished_time = now
        self.error = error

    # --- the one place where usage and timings are computed -------------------------------------

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=self.num_output_tokens,
            image_tokens=self.num_image_tokens,
            image_tokens_kept=self.image_tokens_kept,
            image_kept_fraction_layer_avg=self.image_kept_fraction_layer_avg,
            kv_cache_bytes=self.kv_cache_bytes,
        )

    def ttft_s(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    def queue_s(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    def prefill_s(self) -> float | None:
        if self.scheduled_time is None or self.first_token_time is None:
            return None
        return self.first_token_time - self.scheduled_time

    def timings(self, now: float | None = None) -> Timings:
        end = self.finished_time or now or time.monotonic()
        first = self.first_token_time
        decode_s = max(end - first, 0.0) if first is not None else 0.0
        n = self.num_output_tokens
        return Timings(
            queue_ms=(self.queue_s() if self.scheduled_time is not None else end - self.arrival_time) * 1e3,
            prefill_ms=(self.prefill_s() or 0.0) * 1e3,
            ttft_ms=(self.ttft_s() or 0.0) * 1e3,
            decode_ms=decode_s * 1e3,
            tokens_per_second=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        )
