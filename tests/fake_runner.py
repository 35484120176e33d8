"""A model-free runner with the interface of lightvlm_core.runner.ModelRunner, for service tests.

It runs behind the real EngineCore, Scheduler and EngineClient (in a thread); only the model is
replaced. Output depends only on the request (prompt, image pixels, seed), never on the batch, so
a request's text is the same alone or among others. Prompt markers: "[too-long]" fails prepare
with PromptTooLongError, "[add-fails]" fails its prefill, "[eos@N]" makes the Nth token EOS,
"[prepare-ms@N]" makes its preparation take N ms.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

from lightvlm_core.errors import PromptTooLongError
from lightvlm_core.request import Request
from lightvlm_core.scheduler import PrefillReport, RunnerOutput, SchedulerOutput
from lightvlm_core.types import AccelerationConfig, GenerationRequest

WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "small", "large", "a", "the"]
WORD_ID0 = 1000
EOS_ID = 2
IMAGE_TOKENS = 16
KV_BYTES_PER_TOKEN = 64


class FakeTokenizer:
    """Word-level: token 1000 + i is WORDS[i]; EOS_ID is special."""

    eos_token_id = EOS_ID

    def decode(self, ids: list[int], skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool = False
               ) -> str:
        words = [WORDS[i - WORD_ID0] if i >= WORD_ID0 else "</s>" for i in ids
                 if not (skip_special_tokens and i == EOS_ID)]
        return " ".join(words)


@dataclass
class FakePrompt:
    seed: int
    eos_at: int | None
    images: int
    prefill_fails: bool


@dataclass
class _Row:
    request: Request
    kept_per_image: int = IMAGE_TOKENS


@dataclass
class FakeEngine:
    step_delay: float = 0.0
    model_name: str = "fake-vlm"
    family: str = "fake"
    device: str = "cpu"
    dtype: str = "float32"
    default_acceleration: AccelerationConfig = field(default_factory=AccelerationConfig)
    max_context: int = 4096
    rows: dict[str, _Row] = field(default_factory=dict)
    evicted_tokens_total: int = 0
    image_tokens_total: tuple[int, int] = (0, 0)
    seen_accelerations: list[AccelerationConfig | None] = field(default_factory=list)
    prepared_prompts: list[str] = field(default_factory=list)
    prefill_groups: list[list[str]] = field(default_factory=list)  # request ids prefilled together, per step
    tokenizer: FakeTokenizer = field(default_factory=FakeTokenizer)

    def info(self) -> dict:
        return {"model_name": self.model_name, "family": self.family, "device": self.device, "dtype": self.dtype,
                "default_acceleration": self.default_acceleration, "max_context": self.max_context,
                "eos_token_ids": [EOS_ID]}

    def prepare(self, request: GenerationRequest) -> Request:
        if "[too-long]" in request.prompt:
            raise PromptTooLongError("prompt (5000 tokens) + max_new_tokens do not fit in 4096")
        if delay := re.search(r"\[prepare-ms@(\d+)\]", request.prompt):
            time.sleep(int(delay.group(1)) / 1e3)
        digest = hashlib.sha256(request.prompt.encode())
        for image in request.images:
            digest.update(image.tobytes())
        self.prepared_prompts.append(request.prompt)
        self.seen_accelerations.append(request.acceleration)
        eos = re.search(r"\[eos@(\d+)\]", request.prompt)
        n_images = len(request.images)
        return Request(
            request_id=request.request_id,
            num_prompt_tokens=len(request.prompt.split()) + IMAGE_TOKENS * n_images,
            sampling=request.sampling,
            acceleration=request.acceleration or self.default_acceleration,
            arrival_time=request.arrival_time,
            max_context=self.max_context,
            eos_token_ids=frozenset({EOS_ID}),
            num_image_tokens=IMAGE_TOKENS * n_images,
            prompt=FakePrompt(int(digest.hexdigest()[:8], 16), int(eos.group(1)) if eos else None, n_images,
                              "[add-fails]" in request.prompt),
            return_kept_patches=request.return_kept_patches,
        )

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        self.remove(scheduled.finished_ids)
        if scheduled.is_empty:
            return out
        time.sleep(self.step_delay)
        if scheduled.prefill:
            self.prefill_groups.append([r.request_id for r in scheduled.prefill])
        for request in scheduled.decode:
            self.evicted_tokens_total += 1
            out.sampled[request.request_id] = self._token(request, request.num_output_tokens)
        for request in scheduled.prefill:
            if request.prompt.prefill_fails:
                out.failed[request.request_id] = ("internal_error", "prefill failed: RuntimeError: prefill failed")
                continue
            keep = request.acceleration.keep_ratio if request.acceleration.keep_ratio is not None else 1.0
            row = _Row(request, kept_per_image=max(1, round(IMAGE_TOKENS * keep)))
            self.rows[request.request_id] = row
            n_images = request.prompt.images
            n_in, n_kept = self.image_tokens_total
            self.image_tokens_total = (n_in + IMAGE_TOKENS * n_images, n_kept + row.kept_per_image * n_images)
            out.prefill[request.request_id] = PrefillReport(image_tokens_kept=row.kept_per_image * n_images,
                                                            kv_cache_bytes=self._row_bytes(row))
            out.sampled[request.request_id] = self._token(request, 0)
        for rid, row in self.rows.items():
            out.kv_cache_bytes[rid] = self._row_bytes(row)
        return out

    @staticmethod
    def _token(request: Request, i: int) -> int:
        fake: FakePrompt = request.prompt
        if fake.eos_at is not None and i + 1 == fake.eos_at:
            return EOS_ID
        return WORD_ID0 + (fake.seed + 7 * i) % len(WORDS)

    @staticmethod
    def _row_bytes(row: _Row) -> int:
        return KV_BYTES_PER_TOKEN * (row.request.num_prompt_tokens + row.request.num_output_tokens)

    def remove(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self.rows.pop(rid, None)

    def remove_all(self) -> None:
        self.rows.clear()

    def counters(self) -> tuple[int, int, int]:
        return (self.evicted_tokens_total, *self.image_tokens_total)

    @property
    def num_running(self) -> int:
        return len(self.rows)

    def kv_cache_bytes(self) -> int:
        return sum(self._row_bytes(row) for row in self.rows.values())

    def kv_cache_tokens(self) -> int:
        return sum(row.request.num_prompt_tokens + row.request.num_output_tokens for row in self.rows.values())


def build_fake(**kwargs) -> FakeEngine:
    """For EngineClient.start_process: builds the fake in the engine process."""
    return FakeEngine(**kwargs)
