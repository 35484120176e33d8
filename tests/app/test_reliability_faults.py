"""Faults injected into the real engine (tiny llava) behind the real scheduler and HTTP:
out of memory in a decode step and in a batched prefill, one request whose prefill raises, a
client that disconnects mid-stream, a request that times out, a metrics hook that raises.

In every case the requests hit fail cleanly (an error event, or a JSON error), the others
produce exactly what they produce alone, and the engine ends idle (no rows, no KV bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from bad_inputs import data_url, encode, noise
from prometheus_client.parser import text_string_to_metric_families
from service_fakes import FakeEngine
from service_helpers import live_server, make_settings, wait_for

from app.main import create_app
from lightvlm_core import decode_step, forward
from lightvlm_core.engine import Engine, load_engine


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Callable[[str], Path]) -> Engine:
    return load_engine(str(tiny_model_dir("llava")), device="cpu", dtype="float32")


@contextlib.contextmanager
def serve(engine: Any, **settings: Any) -> Iterator[str]:
    app = create_app(make_settings(warmup=False, max_new_tokens=4096, **settings), engine=engine)
    with live_server(app) as base_url:
        yield base_url
    assert not getattr(engine, "running", None), "the engine kept rows after shutdown"


def gauges(base_url: str) -> dict[str, float]:
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for s in family.samples:
            key = s.name + ("" if "finish_reason" not in s.labels else f"{{{s.labels['finish_reason']}}}")
            totals[key] = totals.get(key, 0.0) + s.value
    return totals


def assert_idle(base_url: str) -> None:
    def idle() -> bool:
        g = gauges(base_url)
        return g["lightvlm_requests_running"] == g["lightvlm_requests_waiting"] == 0 == g["lightvlm_kv_cache_bytes"]

    wait_for(idle, timeout=30)


def body(i: int, max_new_tokens: int = 12, **extra: Any) -> dict[str, Any]:
    image = data_url(encode(noise((24 + 4 * i, 20 + 2 * i), seed=i)))
    return {"prompt": f"Request {i}: what is shown?", "image": image, "max_new_tokens": max_new_tokens,
            "ignore_eos": True, **extra}  # fmt: skip


def solo(base_url: str, request: dict[str, Any]) -> list[int]:
    response = httpx.post(f"{base_url}/generate", json={**request, "stream": False}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["token_ids"]


async def stream_events(
    http: httpx.AsyncClient, request: dict[str, Any], first: asyncio.Event | None = None, stop_after: int = 0
) -> list[Any]:
    """All SSE payloads of one /generate stream; with `stop_after`, disconnect after that many."""
    events: list[Any] = []
    async with http.stream("POST", "/generate", json=request) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                if first is not None:
                    first.set()
                if stop_after and len(events) >= stop_after:
                    break  # leaving the block closes the connection mid-stream
    return events


def token_ids(events: list[Any]) -> list[int]:
    assert events[-1] == "[DONE]" and events[-2]["type"] == "done", events[-3:]
    tokens = [e for e in events[:-2] if e["type"] == "token"]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    return [t["token_id"] for t in tokens]


class StepGate:
    """Wraps the runner's execute: while held, the engine core parks inside a step (the batch is
    frozen, so requests that arrive meanwhile queue up and are admitted together on release)."""

    def __init__(self, engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
        self.hold, self.parked, self.release = threading.Event(), threading.Event(), threading.Event()
        real_execute = engine.runner.execute

        def execute(scheduled: Any) -> Any:
            if self.hold.is_set():
                self.parked.set()
                self.release.wait(30)
                self.hold.clear()
            return real_execute(scheduled)

        monkeypatch.setattr(engine.runner, "execute", execute)


def test_out_of_memory_in_a_decode_step(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The step's rows end with out_of_memory, the cache is cleared and cached device memory is
    released, the request that was waiting is then served, and so is everything after."""
    armed = threading.Event()
    real_decode = decode_step.decode

    def decode(*args: Any, **kwargs: Any) -> torch.Tensor:
        logits = real_decode(*args, **kwargs)  # the KV cache has grown: a mid-step failure
        if armed.is_set():
            armed.clear()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return logits

    monkeypatch.setattr(decode_step, "decode", decode)
    emptied: list[int] = []  # pretend to be on CUDA, to see that the cache is handed back
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(1))

    with serve(engine, max_batch_size=3) as base_url:

        async def main() -> tuple[list[list[Any]], httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
                streams = [asyncio.create_task(stream_events(http, body(i, 3000))) for i in range(2)]
                blocking = asyncio.create_task(http.post("/generate", json=body(2, 3000, stream=False)))
                await asyncio.to_thread(wait_for, lambda: gauges(base_url)["lightvlm_requests_running"] == 3)
                waiting = asyncio.create_task(http.post("/generate", json=body(3, stream=False)))
                await asyncio.to_thread(wait_for, lambda: gauges(base_url)["lightvlm_requests_waiting"] == 1)
                armed.set()
                return await asyncio.gather(*streams), await blocking, await waiting

        failed_streams, failed_json, waited = asyncio.run(main())
        for events in failed_streams:
            assert events[-1] == "[DONE]" and events[-2]["type"] == "error", events[-3:]
            assert events[-2]["error_type"] == "out_of_memory"
        assert failed_json.status_code == 503 and failed_json.json()["error"]["type"] == "out_of_memory"
        assert failed_json.headers["retry-after"] == "1"
        assert emptied, "torch.cuda.empty_cache() was not called"
        assert_idle(base_url)
        # the engine recovered: the waiting request, and new ones, are exactly what they are alone
        assert waited.status_code == 200 and waited.json()["token_ids"] == solo(base_url, body(3))
        for i in (0, 4):
            assert token_ids(asyncio.run(_one_stream(base_url, body(i)))) == solo(base_url, body(i))
        assert gauges(base_url)["lightvlm_requests_total{error}"] == 3


async def _one_stream(base_url: str, request: dict[str, Any]) -> list[Any]:
    async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
        return await stream_events(http, request)


def test_failures_in_a_batched_prefill_stay_with_their_request(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four requests are admitted together beside a running stream: the batched prefill runs out
    of memory, so they are retried one by one; the one whose own prefill raises fails alone, a
    client that disconnects is cancelled, and the rest (and the running stream) are exact."""
    gate = StepGate(engine, monkeypatch)
    runner = engine.runner
    real_advance, real_prefill_group, real_prepare = forward.PrefillRun.advance, runner._prefill_group, runner.prepare
    batch_sizes: list[int] = []
    boom_ids: set[str] = set()

    def advance(run: forward.PrefillRun, *args: Any, **kwargs: Any) -> Any:
        batch_sizes.append(run.state.h.shape[0])
        if run.state.h.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return real_advance(run, *args, **kwargs)

    def prepare(request: Any) -> Any:
        if "[boom]" in request.prompt:
            boom_ids.add(request.request_id)
        return real_prepare(request)

    def prefill_group(group: list[Any], *args: Any, **kwargs: Any) -> Any:
        if len(group) == 1 and group[0].request_id in boom_ids:
            raise RuntimeError("boom: this request's prefill broke")
        return real_prefill_group(group, *args, **kwargs)

    monkeypatch.setattr(forward.PrefillRun, "advance", advance)
    monkeypatch.setattr(runner, "prepare", prepare)
    monkeypatch.setattr(runner, "_prefill_group", prefill_group)
    running = body(9, 400)
    neighbours = [body(10), body(11, prompt="[boom] what is shown?"), body(12), body(13, 2000)]

    with serve(engine, max_batch_size=8) as base_url:

        async def main() -> tuple[list[Any], list[Any]]:
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
                first = asyncio.Event()
                long_stream = asyncio.create_task(stream_events(http, running, first))
                await first.wait()
                gate.hold.set()
                await asyncio.to_thread(gate.parked.wait, 30)
                tasks = [asyncio.create_task(stream_events(http, b, stop_after=5 if i == 3 else 0))
                         for i, b in enumerate(neighbours)]  # fmt: skip
                await asyncio.to_thread(wait_for, lambda: gauges(base_url)["lightvlm_requests_waiting"] == 4)
                await asyncio.sleep(0.3)  # counted from submit on: let the last one finish preparing
                gate.release.set()
                return await long_stream, await asyncio.gather(*tasks)

        long_events, (good1, boom, good2, left) = asyncio.run(main())
        assert 4 in batch_sizes and batch_sizes.count(1) >= 4  # tried together, then one by one
        assert boom[-2]["type"] == "error" and boom[-2]["error_type"] == "internal_error", boom
        assert "boom" in boom[-2]["message"]
        assert len(left) == 5 and all(e["type"] == "token" for e in left)  # disconnected mid-stream
        assert_idle(base_url)
        assert gauges(base_url)["lightvlm_requests_total{cancelled}"] == 1
        assert token_ids(long_events) == solo(base_url, running)
        assert token_ids(good1) == solo(base_url, neighbours[0])
        assert token_ids(good2) == solo(base_url, neighbours[2])


def test_a_timed_out_request_leaves_the_others_exact(engine: Engine) -> None:
    with serve(engine, request_timeout_s=1.0) as base_url:

        async def main() -> tuple[list[Any], list[Any]]:
            async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
                first = asyncio.Event()
                slow = asyncio.create_task(stream_events(http, body(20, 4000), first))
                await first.wait()
                return await slow, await stream_events(http, body(21, 40))

        slow, quick = asyncio.run(main())
        assert slow[-2]["type"] == "error" and slow[-2]["error_type"] == "timeout", slow[-3:]
        assert 0 < len(slow) - 2 < 4000
        assert_idle(base_url)
        assert token_ids(quick) == solo(base_url, body(21, 40))


def test_a_failing_metrics_hook_never_fails_a_request() -> None:
    app = create_app(make_settings(), engine=FakeEngine())

    def broken(*args: Any) -> None:
        raise RuntimeError("metrics backend broke")

    app.state.service.metrics.on_token = broken
    app.state.service.metrics.on_finished = broken
    with live_server(app) as base_url:
        response = httpx.post(f"{base_url}/generate", json={"prompt": "x", "max_new_tokens": 5, "stream": False})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 5
        assert_idle(base_url)
