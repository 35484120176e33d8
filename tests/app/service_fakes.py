"""A model-free engine with the interface of lightvlm_core.engine.Engine, for service tests.

Output depends only on the request (prompt, image pixels, seed), never on the batch, so a
request's text is the same alone or among others. Prompt markers: "[too-long]" fails prepare
with PromptTooLongError, "[add-fails]" fails prefill, "[eos@N]" stops after N tokens.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field

from lightvlm_core.errors import PromptTooLongError
from lightvlm_core.types import AccelerationConfig, DoneEvent, GenerationRequest, Timings, TokenEvent, Usage

WORDS = [
    "red",
    "blue",
    "green",
    "circle",
    "square",
    "triangle",
    "left",
    "right",
    "small",
    "large",
    "a",
    "the",
]
IMAGE_TOKENS = 16
KV_BYTES_PER_TOKEN = 64


@dataclass
class FakePrepared:
    request_id: str
    num_prompt_tokens: int
    request: GenerationRequest
    seed: int


@dataclass
class FakeStepOutput:
    request_id: str
    token: TokenEvent | None = None
    done: DoneEvent | None = None


@dataclass
class _Row:
    prepared: FakePrepared
    text: str = ""
    num_generated: int = 0
    prefill_ms: float = 0.0
    peak_kv_bytes: int = 0
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

    def prepare(self, request: GenerationRequest) -> FakePrepared:
        if "[too-long]" in request.prompt:
            raise PromptTooLongError("prompt (5000 tokens) + max_new_tokens do not fit in 4096")
        digest = hashlib.sha256(request.prompt.encode())
        for image in request.images:
            digest.update(image.tobytes())
        self.prepared_prompts.append(request.prompt)
        num_prompt_tokens = len(request.prompt.split()) + IMAGE_TOKENS * len(request.images)
        return FakePrepared(request.request_id, num_prompt_tokens, request, int(digest.hexdigest()[:8], 16))

    def add(self, prepared: list[FakePrepared]) -> list[FakeStepOutput]:
        if any("[add-fails]" in p.request.prompt for p in prepared):
            raise RuntimeError("prefill failed")
        start = time.monotonic()
        time.sleep(self.step_delay)
        outputs = []
        for p in prepared:
            acceleration = p.request.acceleration or self.default_acceleration
            keep = acceleration.keep_ratio if acceleration.keep_ratio is not None else 1.0
            row = _Row(p, kept_per_image=max(1, round(IMAGE_TOKENS * keep)))
            row.prefill_ms = (time.monotonic() - start) * 1e3
            self.rows[p.request_id] = row
            self.seen_accelerations.append(p.request.acceleration)
            n_in, n_kept = self.image_tokens_total
            n_images = len(p.request.images)
            self.image_tokens_total = (n_in + IMAGE_TOKENS * n_images, n_kept + row.kept_per_image * n_images)
            outputs.append(self._next(p.request_id))
        return outputs

    def step(self) -> list[FakeStepOutput]:
        time.sleep(self.step_delay)
        self.evicted_tokens_total += len(self.rows)
        return [self._next(request_id) for request_id in list(self.rows)]

    def _next(self, request_id: str) -> FakeStepOutput:
        row = self.rows[request_id]
        request = row.prepared.request
        i = row.num_generated
        word_id = (row.prepared.seed + 7 * i) % len(WORDS)
        token = TokenEvent(index=i, token_id=1000 + word_id, text=("" if i == 0 else " ") + WORDS[word_id])
        row.num_generated += 1
        row.text += token.text
        row.peak_kv_bytes = max(row.peak_kv_bytes, self._row_bytes(row))
        eos = re.search(r"\[eos@(\d+)\]", request.prompt)
        reason = None
        if any(s in row.text for s in request.sampling.stop):
            reason = "stop"
        elif eos and not request.sampling.ignore_eos and row.num_generated >= int(eos.group(1)):
            reason = "stop"
        elif row.num_generated >= request.sampling.max_new_tokens:
            reason = "length"
        if reason is None:
            return FakeStepOutput(request_id, token)
        del self.rows[request_id]
        n_images = len(request.images)
        usage = Usage(
            prompt_tokens=row.prepared.num_prompt_tokens,
            completion_tokens=row.num_generated,
            image_tokens=IMAGE_TOKENS * n_images,
            image_tokens_kept=row.kept_per_image * n_images,
            kv_cache_bytes=row.peak_kv_bytes,
        )
        now = time.monotonic()
        timings = Timings(queue_ms=0.0, prefill_ms=row.prefill_ms, ttft_ms=(now - request.arrival_time) * 1e3)
        return FakeStepOutput(request_id, token, DoneEvent(reason, usage, timings))

    @staticmethod
    def _row_bytes(row: _Row) -> int:
        return KV_BYTES_PER_TOKEN * (row.prepared.num_prompt_tokens + row.num_generated)

    def remove(self, request_id: str) -> None:
        self.rows.pop(request_id, None)

    def remove_all(self) -> None:
        self.rows.clear()

    @property
    def num_running(self) -> int:
        return len(self.rows)

    def kv_cache_bytes(self) -> int:
        return sum(self._row_bytes(row) for row in self.rows.values())

    def kv_cache_tokens(self) -> int:
        return sum(row.prepared.num_prompt_tokens + row.num_generated for row in self.rows.values())
