"""A light async load generator for any OpenAI-compatible server: closed loop and Poisson open loop.

A *target* is an async function `send(i) -> RequestRecord` that runs request number `i` to the
end and timestamps every streamed chunk. `openai_target` POSTs `/v1/chat/completions` with
`stream=true` (the body carries the image as a `data:` URL) and reads the SSE stream; it works
against our service and against a peer such as vLLM alike, so both are measured the same way.

Two load shapes drive a target:

- `closed_loop(send, num_requests, concurrency)`: `concurrency` workers, each sends its next
  request as soon as its previous one finishes (the usual "C users" benchmark);
- `open_loop(send, num_requests, rate, seed)`: requests arrive as a Poisson process of `rate`
  per second whatever the service's speed (queueing shows up in TTFT).

What is measured, from the stream: TTFT = first chunk with non-empty `content` after the request
was sent; ITL = gaps between such chunks; output tokens = the final `usage.completion_tokens`
(`stream_options.include_usage`), or the number of content chunks where a server sends no usage;
TPOT = (e2e - TTFT) / (output tokens - 1) per request. A server sends no chunk for a token without
text (a special token, a partial UTF-8 character) and may merge tokens into one chunk: then ITL
spans several tokens and TPOT is the per-token figure; `chunks` is reported beside the tokens.

`summarize(result)` turns the records into percentiles and throughput over the run's wall time.

The client runs in a child process (`run_http_load` -> `python -m lightvlm_core.bench.loadgen`),
never in a server's process, and parses as little as it can: per chunk a byte search, JSON only
for the last chunks of a request (finish reason, usage) and errors. On a 2-core machine a heavy
client (one JSON parse and a text decode per token) takes CPU the servers need.
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
from typing import Any

import httpx

CHAT_PATH = "/v1/chat/completions"


@dataclass
class RequestRecord:
    """What the client saw of one request."""

    index: int
    start: float  # request sent
    token_times: list[float] = field(default_factory=list)  # arrival of each chunk with content
    end: float = 0.0  # stream over (or failure)
    finish_reason: str | None = None
    error: str | None = None
    usage_tokens: int | None = None  # usage.completion_tokens, when the server reports it
    prompt_tokens: int | None = None  # usage.prompt_tokens (both servers should see the same prompt)

    @property
    def num_chunks(self) -> int:
        return len(self.token_times)

    @property
    def num_tokens(self) -> int:
        return self.usage_tokens if self.usage_tokens is not None else len(self.token_times)

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

    @property
    def tpot_s(self) -> float | None:
        """Time per output token after the first: (e2e - TTFT) / (tokens - 1), from usage token
        counts, so tokens a server streams without text (or merges) are counted all the same."""
        if self.ttft_s is None or self.num_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.num_tokens - 1)


Send = Callable[[int], Awaitable[RequestRecord]]


@dataclass
class LoadResult:
    records: list[RequestRecord]
    wall_s: float  # first request sent -> last request finished


# ---- load shapes ---------------------------------------------------------------------------------


async def closed_loop(send: Send, num_requests: int, concurrency: int) -> LoadResult:
    """`concurrency` workers share `num_requests` requests; each sends as soon as it is free."""
    next_index = 0
    records: list[RequestRecord] = []

    async def worker() -> None:
        nonlocal next_index
        while next_index < num_requests:
            i, next_index = next_index, next_index + 1
            records.append(await send(i))

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


async def open_loop(send: Send, num_requests: int, rate: float, seed: int = 0) -> LoadResult:
    """Send request i at the i-th arrival of a seeded Poisson process, never waiting for replies."""
    start = time.perf_counter()

    async def at(i: int, offset: float) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        return await send(i)

    records = await asyncio.gather(*(at(i, t) for i, t in enumerate(poisson_arrivals(num_requests, rate, seed))))
    return LoadResult(list(records), time.perf_counter() - start)


# ---- the OpenAI streaming target -----------------------------------------------------------------


def openai_target(client: httpx.AsyncClient, body_for: Callable[[int], dict[str, Any]]) -> Send:
    """POST `body_for(i)` to /v1/chat/completions, streaming, and timestamp each content chunk."""

    async def send(i: int) -> RequestRecord:
        body = dict(body_for(i), stream=True, stream_options={"include_usage": True})
        record = RequestRecord(i, time.perf_counter())
        try:
            async with client.stream("POST", CHAT_PATH, json=body) as response:
                if response.status_code != 200:
                    await response.aread()
                    record.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return record
                done = await _read_sse(response, record)
            if record.error is None and (record.finish_reason is None or not done):
                record.error = "stream ended without a finish reason and [DONE]"
        except httpx.HTTPError as exc:
            record.error = f"{type(exc).__name__}: {exc}"
        finally:
            record.end = time.perf_counter()
        return record

    return send


async def _read_sse(response: httpx.Response, record: RequestRecord) -> bool:
    """Record the events of an SSE body as they arrive; True once `[DONE]` was read. Works on bytes
    (no text decoding, no line splitting of the whole body)."""
    pending = b""
    async for chunk in response.aiter_bytes():
        now = time.perf_counter()
        *events, pending = (pending + chunk).replace(b"\r\n", b"\n").split(b"\n\n")
        for event in events:
            if event.startswith(b"data:") and on_chunk(record, event[5:].strip(), now):
                return True
    return False


_CONTENT = b'"content":'


def on_chunk(record: RequestRecord, data: bytes, now: float) -> bool:
    """Record one `data:` payload of a chat-completion stream; True once the stream is over."""
    if data == b"[DONE]":
        return True
    k = data.find(_CONTENT)
    if k >= 0:
        value = data[k + len(_CONTENT):k + len(_CONTENT) + 6].lstrip()
        if not value.startswith((b'""', b"null")):  # the role-only first chunk has content ""
            record.token_times.append(now)
    if b'"finish_reason":"' in data or b'"usage":{' in data or data.startswith(b'{"error"'):
        _on_tail(record, json.loads(data))  # a few per request: parse those
    return False


def _on_tail(record: RequestRecord, payload: dict[str, Any]) -> None:
    error = payload.get("error")
    if error is not None:
        record.error = f"{error.get('type') or error.get('code')}: {error.get('message')}" \
            if isinstance(error, dict) else str(error)
        return
    for choice in payload.get("choices") or []:
        if choice.get("finish_reason"):
            record.finish_reason = choice["finish_reason"]
    usage = payload.get("usage")
    if isinstance(usage, dict) and usage.get("completion_tokens") is not None:
        record.usage_tokens = int(usage["completion_tokens"])
        record.prompt_tokens = usage.get("prompt_tokens")


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
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok]
    tokens = sum(r.num_tokens for r in ok)
    wall = max(result.wall_s, 1e-9)

    def ms(values: list[float], q: float) -> float:
        return round(percentile(values, q) * 1e3, 2)

    prompts = sorted({r.prompt_tokens for r in ok if r.prompt_tokens is not None})
    first_error = next((r.error for r in result.records if r.error is not None), None)
    return {
        "requests": len(result.records),
        "errors": len(result.records) - len(ok),
        "first_error": first_error,
        "output_tokens": tokens,
        "chunks": sum(r.num_chunks for r in ok),
        "prompt_tokens": [prompts[0], prompts[-1]] if prompts else None,  # min, max
        "wall_s": round(result.wall_s, 3),
        "output_tokens_per_s": round(tokens / wall, 2),
        "requests_per_s": round(len(ok) / wall, 3),
        "ttft_ms_p50": ms(ttft, 50), "ttft_ms_p99": ms(ttft, 99),
        "itl_ms_p50": ms(itl, 50), "itl_ms_p99": ms(itl, 99),
        "tpot_ms_p50": ms(tpot, 50), "tpot_ms_p99": ms(tpot, 99),
        "e2e_ms_p50": ms(e2e, 50), "e2e_ms_p99": ms(e2e, 99),
    }


# ---- the client in its own process ---------------------------------------------------------------


def run_http_load(url: str, bodies: list[dict[str, Any]], num_requests: int, concurrency: int | None = None,
                  rate: float | None = None, seed: int = 0, timeout_s: float | None = None,
                  headers: dict[str, str] | None = None) -> LoadResult:
    """Closed loop (`concurrency`) or open loop (`rate`) against `url` from a child process;
    request i sends `bodies[i % len(bodies)]`."""
    spec = {"url": url, "bodies": bodies, "num_requests": num_requests, "concurrency": concurrency,
            "rate": rate, "seed": seed, "headers": headers or {}}
    proc = subprocess.run([sys.executable, "-m", "lightvlm_core.bench.loadgen"], input=json.dumps(spec),
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}): {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout)
    records = [RequestRecord(r["index"], r["start"], r["token_times"], r["end"], r["finish_reason"], r["error"],
                             r["usage_tokens"], r["prompt_tokens"]) for r in out["records"]]
    return LoadResult(records, out["wall_s"])


async def _run_spec(spec: dict[str, Any]) -> LoadResult:
    bodies = spec["bodies"]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=spec["url"], timeout=None, limits=limits,
                                 headers=spec.get("headers") or {}) as client:
        send = openai_target(client, lambda i: bodies[i % len(bodies)])
        if spec.get("rate"):
            return await open_loop(send, spec["num_requests"], spec["rate"], spec.get("seed", 0))
        return await closed_loop(send, spec["num_requests"], spec["concurrency"])


def main() -> int:
    """Read a load spec (JSON) on stdin, run it, print the records (JSON) on stdout."""
    result = asyncio.run(_run_spec(json.load(sys.stdin)))
    t0 = min((r.start for r in result.records), default=0.0)
    records = [{"index": r.index, "start": r.start - t0, "token_times": [t - t0 for t in r.token_times],
                "end": r.end - t0, "finish_reason": r.finish_reason, "error": r.error,
                "usage_tokens": r.usage_tokens, "prompt_tokens": r.prompt_tokens} for r in result.records]
    json.dump({"wall_s": result.wall_s, "records": records}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
