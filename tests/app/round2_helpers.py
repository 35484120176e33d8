"""Shared pieces of the round-2 reliability tests: the server, the long stream that runs beside
each battery, metrics scraping and the memory (RSS) of this process and its children."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
from bad_inputs import LIMITS, data_url, encode, noise
from bad_inputs_round2 import API_KEY, ROUND2
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import live_server, make_settings, wait_for

from app.main import create_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}
LONG_TOKENS = 600
DECODED_PIXELS = 2 * 4096 * 4096  # the decoded-pixel budget of the test server: two 4096x4096 images
T = TypeVar("T")


def scrape(base_url: str) -> dict[tuple[str, str], float]:
    """(name, reason label or "") -> value summed over the other labels."""
    totals: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for s in family.samples:
            key = (s.name, s.labels.get("reason", ""))
            totals[key] = totals.get(key, 0.0) + s.value
    return totals


def metric(samples: dict[tuple[str, str], float], name: str, reason: str | None = None) -> float:
    return sum(v for (n, r), v in samples.items() if n == name and (reason is None or r == reason))


def idle_gauges(base_url: str) -> dict[str, float]:
    samples = scrape(base_url)
    names = ("lightvlm_requests_running", "lightvlm_requests_waiting", "lightvlm_kv_cache_bytes")
    return {name: metric(samples, name) for name in names}


def long_request() -> dict[str, Any]:
    return {
        "prompt": "Describe everything in this picture.",
        "image": data_url(encode(noise((40, 32)))),
        "max_new_tokens": LONG_TOKENS,
        "ignore_eos": True,
    }


def long_alone(base_url: str) -> list[int]:
    body = {**long_request(), "stream": False}
    response = httpx.post(f"{base_url}/generate", json=body, headers=AUTH, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()["token_ids"]


def sse_token_ids(lines: list[str]) -> list[int]:
    payloads = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    events = [json.loads(p) for p in payloads[:-1]]
    tokens, done = events[:-1], events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "length", done
    assert [t["index"] for t in tokens] == list(range(len(tokens)))  # nothing lost or reordered
    return [t["token_id"] for t in tokens]


async def beside_long_stream(
    base_url: str, action: Callable[[httpx.AsyncClient], Awaitable[T]], connections: int = 200
) -> tuple[list[int], T, bool]:
    """Run `action` while a long greedy stream holds a batch row; returns the stream's token ids,
    the action's result, and whether the stream was still running when the action ended."""
    limits = httpx.Limits(max_connections=connections)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        async with http.stream("POST", "/generate", json=long_request(), headers=AUTH) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            received = [await anext(lines)]  # the stream holds a batch row now
            result = await action(http)
            overlapped = metric(scrape(base_url), "lightvlm_requests_running") >= 1
            received += [line async for line in lines]
    return sse_token_ids(received), result, overlapped


def tree_rss_bytes(pid: int | None = None) -> int:
    """Resident memory of a process and all its descendants (the engine runs in a child)."""
    pid = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakRss:
    """Samples tree_rss_bytes() every `interval_s` in a thread, between enter and exit."""

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s, self.baseline, self.peak = interval_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.baseline = self.peak = tree_rss_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.baseline) / 2**20


@contextlib.contextmanager
def round2_server(model_dir: Path, **overrides: Any) -> Iterator[str]:
    """The real engine (tiny llava) behind uvicorn, with the battery's limits and an API key."""
    settings = make_settings(
        model=str(model_dir), device="cpu", dtype="float32", warmup=False,
        **{**LIMITS, **ROUND2, "max_decoded_pixels": DECODED_PIXELS, "request_timeout_s": 120.0, **overrides},
    )  # fmt: skip
    with live_server(create_app(settings)) as base_url:
        wait_for(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=120)
        yield base_url
