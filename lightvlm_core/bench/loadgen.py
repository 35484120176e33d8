"""An async load generator for the generation service: closed loop and Poisson open loop.

A *target* is an async function `send(i) -> RequestRecord` that runs request number `i` to the
end and timestamps every streamed token. Two targets are provided:

- `http_target`: POST /generate over real HTTP (httpx), reading the SSE stream;
- `scheduler_target`: the same request submitted to a `Scheduler` in-process (no HTTP), so the
  difference between the two is the cost of the HTTP + SSE layer.

Two load shapes drive a target:

- `closed_loop(send, num_requests, concurrency)`: `concurrency` workers, each sends its next
  request as soon as its previous one finishes (the usual "C users" benchmark);
- `open_loop(send, num_requests, rate, seed)`: requests arrive as a Poisson process of `rate`
  per second whatever the service's speed (queueing shows up in TTFT).

`summarize(records, wall_s)` turns the records into TTFT / inter-token / end-to-end percentiles
and output tokens/s and requests/s over the run's wall time. Times are `time.perf_counter()`.

`run_http_load` runs the HTTP client in a child process (`python -m lightvlm_core.bench.loadgen`):
a client in the server's process would compete with the server and the engine thread for the
GIL, and bill its own JSON/SSE parsing to the service (real clients run elsewhere).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from lightvlm_core.scheduler import Scheduler
    from lightvlm_core.types import GenerationRequest


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    index: int
    start: float  # request sent
    token_times: list[float] = field(default_factory=list)  # arrival of each token event
    end: float = 0.0  # done / error event (or failure) received
    finish_reason: str | None = None
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft_s(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def itl_s(self) -> list[float]:
        t = self.token_times
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def e2e_s(self) -> float:
        return self.end - self.start


Send = Callable[[int], Awaitable[RequestRecord]]


@dataclass
class LoadResult:
    records: list[RequestRecord]
    wall_s: float  # first request sent -> last request finished


# ---- load shapes ---------------------------------------------------------------------------------


async def closed_loop(send: Send, num_requests: int, concurrency: int,
                      on_done: Callable[[RequestRecord], None] | None = None) -> LoadResult:
    """`concurrency` workers share `num_requests` requests; each sends as soon as it is free."""
    next_index = 0
    records: list[RequestRecord] = []

    async def worker() -> None:
        nonlocal next_index
        while next_index < num_requests:
            i, next_index = next_index, next_index + 1
            record = await send(i)
            records.append(record)
            if on_done is not None:
                on_done(record)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, num_requests))))
    return LoadResult(sorted(records, key=lambda r: r.index), time.perf_counter() - start)


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Arrival offsets (s) of a Poisson process with `rate` requests/s; the first arrives at 0."""
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(num_requests):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


async def open_loop(send: Send, num_requests: int, rate: float, seed: int = 0,
                    on_done: Callable[[RequestRecord], None] | None = None) -> LoadResult:
    """Send request i at the i-th arrival of a seeded Poisson process, never waiting for replies."""
    start = time.perf_counter()

    async def at(i: int, offset: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        record = await send(i)
        if on_done is not None:
            on_done(record)
        return record

    records = await asyncio.gather(*(at(i, t) for i, t in enumerate(poisson_arrivals(num_requests, rate, seed))))
    return LoadResult(list(records), time.perf_counter() - start)


# ---- targets -------------------------------------------------------------------------------------


def http_target(client: httpx.AsyncClient, body_for: Callable[[int], dict[str, Any]]) -> Send:
    """POST `body_for(i)` to /generate with streaming on, and timestamp each SSE token event."""

    async def send(i: int) -> RequestRecord:
        body = dict(body_for(i), stream=True)
        record = RequestRecord(i, time.perf_counter())
        try:
            async with client.stream("POST", "/generate", json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return record
                await _read_sse(response, record)
            if record.finish_reason is None and record.error is None:
                record.error = "stream ended without a done event"
        except httpx.HTTPError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.end = time.perf_counter()
        return record

    return send


async def _read_sse(response: httpx.Response, record: RequestRecord) -> bool:
    """Record the events of an SSE body as they arrive; True once `[DONE]` was read. Parses bytes
    (no text decoding or line splitting): the client shares the machine with the server."""
    pending = b""
    async for chunk in response.aiter_bytes():
        now = time.perf_counter()
        *events, pending = (pending + chunk).split(b"\n\n")
        for event in events:
            if event.startswith(b"data: ") and _on_sse_data(record, event[6:], now):
                return True
    return False


def _on_sse_data(record: RequestRecord, data: bytes, now: float) -> bool:
    """Record one `data:` payload; True once the stream is over."""
    if data == b"[DONE]":
        return True
    if data.startswith(b'{"type":"token"'):  # the hot path: no JSON parsing
        record.token_times.append(now)
        return False
    event = json.loads(data)
    kind = event.get("type")
    if kind == "token":
        record.token_times.append(now)
    elif kind == "done":
        record.finish_reason = event.get("finish_reason")
    elif kind == "error":
        record.error = f"{event.get('error_type')}: {event.get('message')}"
    return False


def scheduler_target(scheduler: Scheduler, request_for: Callable[[int], GenerationRequest]) -> Send:
    """Submit `request_for(i)` to `scheduler` in this process and timestamp each token event."""
    from lightvlm_core.types import DoneEvent, ErrorEvent, TokenEvent

    async def send(i: int) -> RequestRecord:
        request = request_for(i)
        record = RequestRecord(i, time.perf_counter())
        try:
            stream = await scheduler.submit(request)
            async for event in stream:
                if isinstance(event, TokenEvent):
                    record.token_times.append(time.perf_counter())
                elif isinstance(event, DoneEvent):
                    record.finish_reason = event.finish_reason
                elif isinstance(event, ErrorEvent):
                    record.error = f"{event.error_type}: {event.message}"
        except Exception as exc:  # submit's typed errors: a failed request, not a crashed bench
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.end = time.perf_counter()
        return record

    return send


# ---- summary -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks; nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(result: LoadResult) -> dict[str, Any]:
    """Latency percentiles (ms) over successful requests, throughput over the run's wall time."""
    ok = [r for r in result.records if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    itl = [gap for r in ok for gap in r.itl_s]
    e2e = [r.e2e_s for r in ok]
    tokens = sum(r.num_tokens for r in ok)
    wall = max(result.wall_s, 1e-9)

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1e3, 2)

    return {
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "output_tokens": tokens,
        "wall_s": round(result.wall_s, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99),
        "itl_ms_p50": ms(itl, 50), "itl_ms_p99": ms(itl, 99),
        "e2e_ms_p50": ms(e2e, 50), "e2e_ms_p99": ms(e2e, 99),
    }


# ---- the client in its own process ---------------------------------------------------------------


def run_http_load(url: str, bodies: list[dict[str, Any]], num_requests: int, concurrency: int | None = None,
                  rate: float | None = None, seed: int = 0, timeout_s: float | None = None) -> LoadResult:
    """Closed loop (`concurrency`) or open loop (`rate`) over HTTP from a child process; request i
    sends `bodies[i % len(bodies)]`."""
    spec = {"url": url, "bodies": bodies, "num_requests": num_requests, "concurrency": concurrency,
            "rate": rate, "seed": seed}
    proc = subprocess.run([sys.executable, "-m", "lightvlm_core.bench.loadgen"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    records = [RequestRecord(r["index"], r["start"], r["token_times"], r["end"], r["finish_reason"], r["error"])
               for r in out["records"]]
    return LoadResult(records, out["wall_s"])


async def _run_spec(spec: dict[str, Any]) -> LoadResult:
    bodies = spec["bodies"]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=spec["url"], timeout=None, limits=limits) as client:
        send = http_target(client, lambda i: bodies[i % len(bodies)])
        if spec.get("rate"):
            return await open_loop(send, spec["num_requests"], spec["rate"], spec.get("seed", 0))
        return await closed_loop(send, spec["num_requests"], spec["concurrency"])


def main() -> int:
    """Read a load spec (JSON) on stdin, run it, print the records (JSON) on stdout."""
    result = asyncio.run(_run_spec(json.load(sys.stdin)))
    t0 = min((r.start for r in result.records), default=0.0)
    records = [{"index": r.index, "start": r.start - t0, "token_times": [t - t0 for t in r.token_times],
                "end": r.end - t0, "finish_reason": r.finish_reason, "error": r.error} for r in result.records]
    json.dump({"wall_s": result.wall_s, "records": records}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
