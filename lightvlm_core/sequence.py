"""One request's state while it runs in the batch: tokens, text, stop checks, usage, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from lightvlm_core.detok import IncrementalDetokenizer
from lightvlm_core.models.base import PromptInputs
from lightvlm_core.types import (
    AccelerationConfig,
    DoneEvent,
    FinishReason,
    GenerationRequest,
    Timings,
    TokenEvent,
    Usage,
)


@dataclass
class PreparedRequest:
    """A validated, tokenised request, ready for prefill (built by `Engine.prepare`)."""

    request: GenerationRequest
    prompt: PromptInputs
    positions: torch.Tensor  # (T,) or (3, T)
    next_position: int  # position id of the first generated token
    acceleration: AccelerationConfig
    num_image_tokens: int

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_prompt_tokens(self) -> int:
        return int(self.prompt.input_ids.shape[0])


@dataclass
class StepOutput:
    request_id: str
    token: TokenEvent | None = None
    done: DoneEvent | None = None


@dataclass
class Sequence:
    prepared: PreparedRequest
    detok: IncrementalDetokenizer
    generator: torch.Generator | None
    eos_ids: frozenset[int]
    max_context: int
    prefill_start: float
    prefill_end: float = 0.0
    next_position: int = 0
    token_ids: list[int] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def sampling(self):
        return self.prepared.request.sampling

    def accept(self, token_id: int) -> StepOutput:
        """Record a generated token; returns its event, with `done` set if the request finished."""
        index = len(self.token_ids)
        self.token_ids.append(token_id)
        self.next_position += 1
        is_eos = token_id in self.eos_ids and not self.sampling.ignore_eos
        text = self.detok.add(token_id) if not is_eos else ""
        out = StepOutput(self.request_id, token=TokenEvent(index=index, token_id=token_id, text=text))
        reason = self._finish_reason(is_eos)
        if reason is not None:
            out.token.text += self.detok.finish()
            out.done = self.done_event(reason)
        return out

    def _finish_reason(self, is_eos: bool) -> FinishReason | None:
        if is_eos or self.detok.stopped:
            return "stop"
        if len(self.token_ids) >= self.sampling.max_new_tokens:
            return "length"
        if self.prepared.num_prompt_tokens + len(self.token_ids) >= self.max_context:
            return "length"
        return None

    def done_event(self, reason: FinishReason) -> DoneEvent:
        now = time.monotonic()
        arrival = self.prepared.request.arrival_time
        first = self.prefill_end or now
        decode_s = max(now - first, 0.0)
        n = len(self.token_ids)
        self.usage.completion_tokens = n
        timings = Timings(
            queue_ms=(self.prefill_start - arrival) * 1e3,
            prefill_ms=(first - self.prefill_start) * 1e3,
            ttft_ms=(first - arrival) * 1e3,
            decode_ms=decode_s * 1e3,
            tokens_per_second=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0,
        )
        return DoneEvent(finish_reason=reason, usage=self.usage, timings=timings)
