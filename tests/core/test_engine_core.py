"""EngineCore + EngineClient over their pipes, with the fake runner (tests/fake_runner.py): the core
in a thread, and in its own process for what only a process can show (it dies)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
from fake_runner import EOS_ID, FakeEngine, FakeTokenizer

from lightvlm_core import core
from lightvlm_core.client import EngineClient, EngineClosedError, QueueFullError, SchedulerObserver
from lightvlm_core.errors import PromptTooLongError
from lightvlm_core.scheduler import SchedulerConfig
from lightvlm_core.types import DoneEvent, ErrorEvent, GenerationRequest, SamplingParams, TokenEvent


class Recorder(SchedulerObserver):
    def __init__(self) -> None:
        self.batch_sizes: list[int] = []
        self.finished: list[str] = []
        self.ttfts: list[float] = []

    def on_step(self, batch_size: int) -> None:
        self.batch_sizes.append(batch_size)

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        self.finished.append(finish_reason)

    def on_token(self, ttft_s: float | None, itl_s: float | None) -> None:
        if ttft_s is not None:
            self.ttfts.append(ttft_s)


def request(prompt: str = "describe", n: int = 4, **sampling) -> GenerationRequest:
    return GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=n, **sampling))


def start(runner: FakeEngine | None = None, observer: SchedulerObserver | None = None, **config) -> EngineClient:
    return EngineClient.start_in_thread(runner or FakeEngine(), SchedulerConfig(**config), FakeTokenizer(), observer)


async def events_of(client: EngineClient, req: GenerationRequest) -> list:
    return [e async for e in await client.submit(req)]


def test_tokens_then_done_with_usage_and_the_observer_sees_the_same_ttft() -> None:
    recorder = Recorder()
    client = start(observer=recorder)
    try:
        events = asyncio.run(events_of(client, request(n=4)))
    finally:
        client.shutdown()
    assert [type(e) for e in events] == [TokenEvent] * 4 + [DoneEvent]
    done = events[-1]
    assert done.finish_reason == "length" and done.usage.completion_tokens == 4
    assert recorder.ttfts == [pytest.approx(done.timings.ttft_ms / 1e3, abs=1e-3)]
    assert recorder.finished == ["length"]


def test_batch_size_bound_and_every_stream_completes() -> None:
    recorder = Recorder()
    client = start(FakeEngine(step_delay=0.002), recorder, max_batch_size=3)

    async def main() -> list[list]:
        return await asyncio.gather(*(events_of(client, request(f"prompt {i}", n=5)) for i in range(8)))

    try:
        results = asyncio.run(main())
    finally:
        client.shutdown()
    assert all(isinstance(r[-1], DoneEvent) and len(r) == 6 for r in results)
    assert max(recorder.batch_sizes) == 3 and client.stats().num_running == 0


def test_stop_strings_are_found_in_the_api_process() -> None:
    client = start()
    try:
        events = asyncio.run(events_of(client, request("same seed", n=12)))
        words = "".join(e.text for e in events if isinstance(e, TokenEvent)).split()
        stop = words[2]
        stopped = asyncio.run(events_of(client, request("same seed", n=12, stop=(stop,))))
    finally:
        client.shutdown()
    text = "".join(e.text for e in stopped if isinstance(e, TokenEvent))
    done = stopped[-1]
    assert done.finish_reason == "stop" and stop not in text and text.split() == words[: words.index(stop)]
    assert done.usage.completion_tokens == len([e for e in stopped if isinstance(e, TokenEvent)])


def test_eos_ends_the_request_without_text() -> None:
    client = start()
    try:
        events = asyncio.run(events_of(client, request("x [eos@2]", n=10)))
    finally:
        client.shutdown()
    assert events[1].token_id == EOS_ID and events[1].text == "" and events[-1].finish_reason == "stop"


def test_a_burst_of_arrivals_prefills_as_one_batch(monkeypatch) -> None:
    """Requests still being prepared hold the ready ones' prefill (core.GATHER_S), so a burst
    prefills in one step instead of the first alone and the rest after it."""
    monkeypatch.setattr(core, "GATHER_S", 0.5)  # generous: CI machines are slow; the test ends sooner
    runner = FakeEngine()
    client = start(runner)
    burst = [request(f"[prepare-ms@{5 * (i + 1)}] q{i}", n=2) for i in range(4)]  # ready 5 to 20 ms apart

    async def main() -> list[list]:
        return await asyncio.gather(*(events_of(client, r) for r in burst))

    try:
        results = asyncio.run(main())
    finally:
        client.shutdown()
    assert all(isinstance(r[-1], DoneEvent) for r in results)
    assert sorted(runner.prefill_groups[0]) == sorted(r.request_id for r in burst)


def test_a_slow_preparation_holds_a_ready_prefill_at_most_gather_s(monkeypatch) -> None:
    monkeypatch.setattr(core, "GATHER_S", 0.05)
    runner = FakeEngine()
    client = start(runner)
    quick, slow = request("quick", n=2), request("[prepare-ms@1500] slow", n=2)

    async def main() -> list[list]:
        return await asyncio.gather(events_of(client, quick), events_of(client, slow))

    try:
        quick_events, slow_events = asyncio.run(main())
    finally:
        client.shutdown()
    assert runner.prefill_groups == [[quick.request_id], [slow.request_id]]
    assert quick_events[-1].timings.ttft_ms < 1000  # not held until the slow one was ready


def test_queue_full_prepare_errors_and_cancel() -> None:
    runner = FakeEngine(step_delay=0.01)
    client = start(runner, max_batch_size=1, max_queue=1)

    async def main() -> None:
        with pytest.raises(PromptTooLongError):
            await client.submit(request("[too-long]"))
        first = await client.submit(request("first", n=1000, ignore_eos=True))
        second = await client.submit(request("second", n=1000, ignore_eos=True))
        with pytest.raises(QueueFullError):
            await client.submit(request("third"))
        second.cancel()  # waiting
        assert [e.finish_reason async for e in second if isinstance(e, DoneEvent)] == ["cancelled"]
        seen = 0
        async for event in first:
            seen += 1
            if seen == 3:
                first.cancel()  # running
        assert isinstance(event, DoneEvent) and event.finish_reason == "cancelled"

    try:
        asyncio.run(main())
        deadline = time.monotonic() + 5
        while (runner.rows or client.stats().kv_cache_bytes) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not runner.rows and client.stats().kv_cache_bytes == 0 and client.stats().num_running == 0
    finally:
        client.shutdown()


def test_timeout_and_a_failing_prefill_end_only_their_request() -> None:
    client = start(FakeEngine(step_delay=0.01), request_timeout_s=0.3)

    async def main() -> tuple[list, list, list]:
        return await asyncio.gather(events_of(client, request("slow", n=10_000, ignore_eos=True)),
                                    events_of(client, request("bad [add-fails]", n=3)),
                                    events_of(client, request("good", n=3)))

    try:
        slow, bad, good = asyncio.run(main())
    finally:
        client.shutdown()
    assert isinstance(slow[-1], ErrorEvent) and slow[-1].error_type == "timeout"
    assert bad == [ErrorEvent("internal_error", "prefill failed: RuntimeError: prefill failed")]
    assert isinstance(good[-1], DoneEvent) and good[-1].finish_reason == "length"


def test_shutdown_ends_streams_in_flight_and_refuses_new_ones() -> None:
    client = start(FakeEngine(step_delay=0.01))

    async def main() -> None:
        stream = await client.submit(request(n=100_000, ignore_eos=True))
        await asyncio.to_thread(client.shutdown)
        events = [e async for e in stream]
        assert isinstance(events[-1], ErrorEvent) and events[-1].error_type == "not_ready"
        with pytest.raises(EngineClosedError):
            await client.submit(request())

    asyncio.run(main())


def test_a_killed_engine_process_ends_every_stream_at_once() -> None:
    deaths: list[float] = []
    client = EngineClient.start_process("fake_runner:build_fake", {"step_delay": 0.01},
                                        SchedulerConfig(max_batch_size=8), FakeTokenizer(), warmup=False)
    client.on_death = lambda: deaths.append(time.monotonic())

    async def main() -> list[list]:
        streams = [await client.submit(request(f"p{i}", n=100_000, ignore_eos=True)) for i in range(8)]
        await asyncio.sleep(0.3)
        killed = time.monotonic()
        os.kill(client.pid, signal.SIGKILL)
        async def drain(stream) -> list:
            return [e async for e in stream]

        results = await asyncio.wait_for(asyncio.gather(*(drain(s) for s in streams)), timeout=10)
        assert time.monotonic() - killed < 10
        return results

    try:
        results = asyncio.run(main())
    finally:
        client.shutdown()
    for events in results:
        assert isinstance(events[-1], ErrorEvent) and events[-1].error_type == "engine_failed"
        assert any(isinstance(e, TokenEvent) for e in events)
    assert len(deaths) == 1 and not client.is_running
