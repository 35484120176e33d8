"""Scheduler tests: continuous batching, queue bound, cancellation, time-outs and failure isolation.

No model: a scriptable fake engine (same interface as lightvlm_core.engine.Engine) produces
tokens "t0 ", "t1 ", ... and reports KV bytes proportional to the tokens it holds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pytest

from lightvlm_core.errors import InvalidRequestError
from lightvlm_core.scheduler import (
    QueueFullError,
    RequestFailedError,
    Scheduler,
    SchedulerClosedError,
    SchedulerConfig,
    SchedulerObserver,
)
from lightvlm_core.types import (
    AccelerationConfig,
    DoneEvent,
    ErrorEvent,
    GenerationRequest,
    SamplingParams,
    Timings,
    TokenEvent,
    Usage,
)

KV_BYTES_PER_TOKEN = 10


@dataclass
class FakePrepared:
    request_id: str
    num_prompt_tokens: int
    request: GenerationRequest


@dataclass
class FakeStepOutput:
    request_id: str
    token: TokenEvent | None = None
    done: DoneEvent | None = None


class FakeEngine:
    """Deterministic engine. Prompt markers: "[invalid]" fails prepare, "[add-fails]" fails add,
    "[short]" stops (finish_reason "stop") after 2 tokens."""

    def __init__(self, step_delay: float = 0.0) -> None:
        self.rows: dict[str, list[Any]] = {}  # request_id -> [prepared, num_generated]
        self.add_sizes: list[int] = []
        self.step_sizes: list[int] = []
        self.removed: list[str] = []
        self.accelerations: list[AccelerationConfig | None] = []
        self.gate = threading.Event()  # clear it to park the engine thread at its next decode step
        self.gate.set()
        self.parked = threading.Event()
        self.fail_step_at_size: int | None = None  # the first step with at least this many rows raises
        self.step_delay = step_delay
        self.evicted_tokens_total = 0
        self.image_tokens_total = (0, 0)

    def prepare(self, request: GenerationRequest) -> FakePrepared:
        if "[invalid]" in request.prompt:
            raise InvalidRequestError("bad prompt")
        return FakePrepared(request.request_id, len(request.prompt.split()), request)

    def add(self, prepared: list[FakePrepared]) -> list[FakeStepOutput]:
        self.add_sizes.append(len(prepared))
        if any("[add-fails]" in p.request.prompt for p in prepared):
            raise RuntimeError("prefill exploded")
        for p in prepared:
            self.rows[p.request_id] = [p, 0]
            self.accelerations.append(p.request.acceleration)
            n_in, n_kept = self.image_tokens_total
            self.image_tokens_total = (n_in + 8 * len(p.request.images), n_kept + 4 * len(p.request.images))
        return [self._next(p.request_id) for p in prepared]

    def step(self) -> list[FakeStepOutput]:
        if not self.gate.is_set():
            self.parked.set()
            self.gate.wait()
            self.parked.clear()
        time.sleep(self.step_delay)
        if self.fail_step_at_size is not None and len(self.rows) >= self.fail_step_at_size:
            self.fail_step_at_size = None
            raise RuntimeError("CUDA out of memory (fake)")
        self.step_sizes.append(len(self.rows))
        self.evicted_tokens_total += len(self.rows)
        return [self._next(request_id) for request_id in list(self.rows)]

    def _next(self, request_id: str) -> FakeStepOutput:
        row = self.rows[request_id]
        prepared, n = row
        row[1] = n + 1
        token = TokenEvent(n, 100 + n, f"t{n} ")
        request = prepared.request
        reason = None
        if "[short]" in request.prompt and n + 1 >= 2:
            reason = "stop"
        elif n + 1 >= request.sampling.max_new_tokens:
            reason = "length"
        if reason is None:
            return FakeStepOutput(request_id, token)
        del self.rows[request_id]
        usage = Usage(prompt_tokens=prepared.num_prompt_tokens, completion_tokens=n + 1)
        return FakeStepOutput(request_id, token, DoneEvent(reason, usage, Timings()))

    def remove(self, request_id: str) -> None:
        if self.rows.pop(request_id, None) is not None:
            self.removed.append(request_id)

    def remove_all(self) -> None:
        self.removed.extend(self.rows)
        self.rows.clear()

    @property
    def num_running(self) -> int:
        return len(self.rows)

    def kv_cache_tokens(self) -> int:
        return sum(p.num_prompt_tokens + n for p, n in self.rows.values())

    def kv_cache_bytes(self) -> int:
        return KV_BYTES_PER_TOKEN * self.kv_cache_tokens()


class RecordingObserver(SchedulerObserver):
    def __init__(self) -> None:
        self.admitted: list[tuple[float, float, int]] = []
        self.ttfts: list[float] = []
        self.itls: list[float] = []
        self.finished: list[str] = []
        self.batch_sizes: list[int] = []
        self.counters = [0, 0, 0]

    def on_admitted(self, queue_s: float, prefill_s: float, num_prompt_tokens: int) -> None:
        self.admitted.append((queue_s, prefill_s, num_prompt_tokens))

    def on_token(self, ttft_s: float | None, itl_s: float | None) -> None:
        (self.ttfts if ttft_s is not None else self.itls).append(ttft_s if ttft_s is not None else itl_s)

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        self.finished.append(finish_reason)

    def on_step(self, batch_size: int) -> None:
        self.batch_sizes.append(batch_size)

    def on_engine_counters(self, evicted_tokens: int, image_tokens_in: int, image_tokens_kept: int) -> None:
        for i, v in enumerate((evicted_tokens, image_tokens_in, image_tokens_kept)):
            self.counters[i] += v


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def make_request(
    prompt: str = "describe the scene", max_new_tokens: int = 4, **kwargs: Any
) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=max_new_tokens), **kwargs)


def make_scheduler(engine: FakeEngine, **config: Any) -> Scheduler:
    scheduler = Scheduler(engine, SchedulerConfig(**config), RecordingObserver())
    scheduler.start()
    return scheduler


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


async def wait_until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.005)


async def park(engine: FakeEngine, scheduler: Scheduler) -> Any:
    """Submit a 2-token blocker and park the engine thread in its decode step; returns the blocker."""
    engine.gate.clear()
    blocker = await scheduler.submit(make_request(max_new_tokens=2))
    await wait_until(engine.parked.is_set)
    return blocker


def test_stream_yields_tokens_then_done(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine)

    async def main() -> list[Any]:
        stream = await scheduler.submit(make_request(max_new_tokens=3))
        return [event async for event in stream]

    try:
        events = run(main())
    finally:
        scheduler.shutdown()
    assert [e.text for e in events[:-1]] == ["t0 ", "t1 ", "t2 "]
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "length"
    assert events[-1].usage.completion_tokens == 3
    observer = scheduler.observer
    assert isinstance(observer, RecordingObserver)
    assert observer.finished == ["length"] and len(observer.ttfts) == 1 and len(observer.itls) == 2
    assert observer.admitted[0][2] == 3  # prompt tokens
    assert scheduler.stats().num_running == 0 and scheduler.stats().kv_cache_bytes == 0


def test_collect_returns_the_whole_generation(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine)

    async def main() -> Any:
        stream = await scheduler.submit(make_request("[short] hi", max_new_tokens=10))
        return await stream.collect()

    try:
        result = run(main())
    finally:
        scheduler.shutdown()
    assert result.text == "t0 t1 " and result.token_ids == [100, 101] and result.finish_reason == "stop"


def test_continuous_batching_respects_max_batch_size(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine, max_batch_size=2)

    async def main() -> list[Any]:
        blocker = await park(engine, scheduler)
        streams = [await scheduler.submit(make_request(max_new_tokens=n)) for n in (2, 5, 3)]
        engine.gate.set()
        return await asyncio.gather(*(s.collect() for s in [blocker, *streams]))

    try:
        results = run(main())
    finally:
        scheduler.shutdown()
    assert [len(r.token_ids) for r in results] == [2, 2, 5, 3]
    assert max(engine.step_sizes) == 2
    # the last request joins as soon as the 2-token one retires, while the 5-token one still runs
    assert engine.add_sizes == [1, 2, 1]
    assert engine.step_sizes[1:4] == [2, 2, 2]


def test_waiting_requests_are_prefilled_together(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine, max_batch_size=8)

    async def main() -> None:
        blocker = await park(engine, scheduler)
        others = [await scheduler.submit(make_request(max_new_tokens=2)) for _ in range(3)]
        engine.gate.set()
        await asyncio.gather(blocker.collect(), *(s.collect() for s in others))

    try:
        run(main())
    finally:
        scheduler.shutdown()
    assert engine.add_sizes == [1, 3]
    assert engine.step_sizes == [1, 3]


def test_queue_bound_raises_queue_full(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine, max_batch_size=1, max_queue=1)

    async def main() -> None:
        running = await scheduler.submit(make_request(max_new_tokens=10_000))
        await wait_until(lambda: scheduler.stats().num_running == 1)
        waiting = await scheduler.submit(make_request())
        assert scheduler.stats().num_waiting == 1
        with pytest.raises(QueueFullError):
            await scheduler.submit(make_request())
        running.cancel()
        waiting.cancel()
        await asyncio.gather(running.collect(), waiting.collect())
        assert scheduler.stats().num_waiting == 0
        await (await scheduler.submit(make_request(max_new_tokens=1))).collect()  # room again

    try:
        run(main())
    finally:
        scheduler.shutdown()


def test_cancel_running_request_frees_its_row(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine, max_batch_size=4)
    engine.step_delay = 0.002

    async def main() -> tuple[list[Any], Any]:
        victim = await scheduler.submit(make_request(max_new_tokens=10_000))
        other = await scheduler.submit(make_request(max_new_tokens=20))
        events = []
        async for event in victim:
            events.append(event)
            if len(events) == 3:
                victim.cancel()
        return events, await other.collect()

    try:
        events, other_result = run(main())
        stats = scheduler.stats()
    finally:
        scheduler.shutdown()
    done = events[-1]
    assert isinstance(done, DoneEvent) and done.finish_reason == "cancelled"
    assert done.usage.completion_tokens == len(events) - 1 >= 3
    assert done.timings.ttft_ms > 0
    assert len(engine.removed) == 1 and not engine.rows
    assert other_result.finish_reason == "length" and len(other_result.token_ids) == 20
    assert stats.num_running == 0 and stats.kv_cache_bytes == 0 and stats.kv_cache_tokens == 0
    assert "cancelled" in scheduler.observer.finished  # type: ignore[attr-defined]


def test_cancel_waiting_request(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine, max_batch_size=1)

    async def main() -> list[Any]:
        first = await scheduler.submit(make_request(max_new_tokens=10_000))
        await wait_until(lambda: scheduler.stats().num_running == 1)
        second = await scheduler.submit(make_request())
        second.cancel()
        events = [e async for e in second]
        first.cancel()
        await first.collect()
        return events

    try:
        events = run(main())
    finally:
        scheduler.shutdown()
    assert len(events) == 1 and isinstance(events[0], DoneEvent) and events[0].finish_reason == "cancelled"
    assert engine.add_sizes == [1]  # the cancelled request never reached the engine
    assert scheduler.stats().num_waiting == 0


def test_timeout_ends_request_with_error(engine: FakeEngine) -> None:
    engine.step_delay = 0.01
    scheduler = make_scheduler(engine, request_timeout_s=0.2)

    async def main() -> list[Any]:
        stream = await scheduler.submit(make_request(max_new_tokens=10_000))
        return [e async for e in stream]

    try:
        events = run(main())
    finally:
        scheduler.shutdown()
    assert isinstance(events[-1], ErrorEvent) and events[-1].error_type == "timeout"
    assert not engine.rows and scheduler.stats().kv_cache_bytes == 0


def test_failed_prefill_only_fails_the_bad_request(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine)

    async def main() -> list[Any]:
        blocker = await park(engine, scheduler)
        prompts = ["good one", "bad [add-fails]", "good two"]
        streams = [await scheduler.submit(make_request(p, max_new_tokens=3)) for p in prompts]
        engine.gate.set()
        await blocker.collect()
        return await asyncio.gather(*(s.collect() for s in streams), return_exceptions=True)

    try:
        results = run(main())
    finally:
        scheduler.shutdown()
    assert results[0].text == results[2].text == "t0 t1 t2 "
    assert isinstance(results[1], RequestFailedError) and results[1].error_type == "internal_error"
    assert engine.add_sizes == [1, 3, 1, 1, 1]  # tried as one batch first, then one by one


def test_failed_step_fails_running_requests_and_recovers(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine, max_batch_size=2)

    async def main() -> tuple[list[Any], Any, Any]:
        blocker = await park(engine, scheduler)
        running = [await scheduler.submit(make_request(max_new_tokens=10_000)) for _ in range(2)]
        waiting = await scheduler.submit(
            make_request(max_new_tokens=3)
        )  # no free row: not in the failing step
        engine.fail_step_at_size = 2
        engine.gate.set()
        await blocker.collect()
        failed = await asyncio.gather(*(s.collect() for s in running), return_exceptions=True)
        return failed, await waiting.collect(), await (await scheduler.submit(make_request())).collect()

    try:
        failed, waited, after = run(main())
    finally:
        scheduler.shutdown()
    assert all(isinstance(r, RequestFailedError) and "out of memory" in str(r) for r in failed)
    assert waited.text == "t0 t1 t2 " and after.finish_reason == "length"
    assert not engine.rows


def test_prepare_error_raises_at_submit_and_frees_the_slot(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine, max_batch_size=1, max_queue=0)

    async def main() -> None:
        for _ in range(3):
            with pytest.raises(InvalidRequestError):
                await scheduler.submit(make_request("[invalid]"))
        assert scheduler.stats().num_waiting == 0
        await (await scheduler.submit(make_request(max_new_tokens=1))).collect()

    try:
        run(main())
    finally:
        scheduler.shutdown()


def test_acceleration_override_reaches_the_engine(engine: FakeEngine) -> None:
    scheduler = make_scheduler(engine)
    override = AccelerationConfig(preset="aggressive", keep_ratio=0.25, kv_budget=64)

    async def main() -> None:
        await (await scheduler.submit(make_request(acceleration=override))).collect()
        await (await scheduler.submit(make_request())).collect()

    try:
        run(main())
    finally:
        scheduler.shutdown()
    assert engine.accelerations == [override, None]


def test_engine_counters_flow_to_the_observer(engine: FakeEngine) -> None:
    scheduler = Scheduler(engine, SchedulerConfig(), RecordingObserver())
    img = __import__("PIL.Image", fromlist=["Image"]).new("RGB", (8, 8))
    scheduler.warm_up(make_request(images=[img]))  # not counted
    scheduler.start()

    async def main() -> None:
        await (await scheduler.submit(make_request(max_new_tokens=3, images=[img, img]))).collect()

    try:
        run(main())
    finally:
        scheduler.shutdown()
    observer = scheduler.observer
    assert isinstance(observer, RecordingObserver)
    assert observer.counters == [2, 16, 8]  # 2 decode steps, 2 images x (8 in, 4 kept)
    assert observer.batch_sizes == [1, 1]


def test_shutdown_fails_inflight_and_rejects_new(engine: FakeEngine) -> None:
    engine.step_delay = 0.005
    scheduler = make_scheduler(engine)

    async def main() -> None:
        stream = await scheduler.submit(make_request(max_new_tokens=10_000))
        await wait_until(lambda: scheduler.stats().num_running == 1)
        await asyncio.to_thread(scheduler.shutdown)
        with pytest.raises(RequestFailedError):
            await stream.collect()
        with pytest.raises(SchedulerClosedError):
            await scheduler.submit(make_request())

    run(main())


def test_submit_before_start_is_refused(engine: FakeEngine) -> None:
    scheduler = Scheduler(engine)
    with pytest.raises(SchedulerClosedError):
        run(scheduler.submit(make_request()))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        SchedulerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="request_timeout_s"):
        SchedulerConfig(request_timeout_s=0)
