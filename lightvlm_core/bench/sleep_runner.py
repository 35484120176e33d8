"""A runner whose every step takes a fixed time and emits fixed token ids: the instrument for
measuring what the serving path costs around an engine (IPC, detokenisation, SSE), with the
model's own time held constant. Used by scripts/bench_overhead.py; never by the service itself."""

from __future__ import annotations

import time

from lightvlm_core.request import Request
from lightvlm_core.scheduler import RunnerOutput, SchedulerOutput
from lightvlm_core.types import AccelerationConfig, GenerationRequest

TOKEN_IDS = (20, 21, 22, 23, 24, 25, 26, 27)  # ordinary vocabulary entries of any real tokenizer


class SleepRunner:
    def __init__(self, step_s: float = 0.010, max_context: int = 1 << 16) -> None:
        self.step_s = step_s
        self.max_context = max_context
        self.rows: set[str] = set()

    def info(self) -> dict:
        return {"model_name": f"sleep-{self.step_s * 1e3:g}ms", "family": "sleep", "device": "cpu",
                "dtype": "none", "default_acceleration": AccelerationConfig(), "max_context": self.max_context,
                "eos_token_ids": []}

    def prepare(self, request: GenerationRequest) -> Request:
        return Request(request.request_id, len(request.prompt.split()), request.sampling,
                       request.acceleration or AccelerationConfig(), request.arrival_time, self.max_context)

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        self.remove(scheduled.finished_ids)
        if scheduled.is_empty:
            return out
        time.sleep(self.step_s)
        for request in scheduled.prefill + scheduled.decode:
            self.rows.add(request.request_id)
            out.sampled[request.request_id] = TOKEN_IDS[request.num_output_tokens % len(TOKEN_IDS)]
        return out

    def remove(self, request_ids: list[str]) -> None:
        self.rows.difference_update(request_ids)

    def remove_all(self) -> None:
        self.rows.clear()

    def counters(self) -> tuple[int, int, int]:
        return (0, 0, 0)

    def kv_cache_bytes(self) -> int:
        return 0

    def kv_cache_tokens(self) -> int:
        return 0


def sleep_runner(step_ms: float = 10.0, **_ignored) -> SleepRunner:
    """Builder for EngineClient / the service (model, device, ... are ignored)."""
    return SleepRunner(step_ms / 1e3)
