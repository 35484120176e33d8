"""End to end over real HTTP (uvicorn on a loopback port) with the real engine and a tiny llava.

The app loads the model itself (background load, warm-up, then /ready), exactly as in production.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import data_url, image_bytes, live_server, make_settings, wait_for

from app.main import create_app

NUM_CONCURRENT = 32
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """On a shared, oversubscribed CPU box, torch's intra-op thread pool makes a tiny model's
    prefill ~100x slower (threads wait on each other); these tests check behaviour, not speed."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("llava")


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    settings = make_settings(
        model=str(model_dir), device="cpu", dtype="float32", max_batch_size=8, max_queue=64
    )
    with live_server(create_app(settings)) as base_url:
        wait_for(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=120)
        yield base_url


def metrics(base_url: str) -> dict[tuple[str, frozenset], float]:
    text = httpx.get(f"{base_url}/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def request_body(i: int, **extra: Any) -> dict[str, Any]:
    color = ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256)
    image = data_url(image_bytes(color, size=(20 + 3 * i, 16 + 2 * i)))
    prompt = f"Question {i}: what colour is the {'square' if i % 2 else 'circle'}?"
    return {"prompt": prompt, "image": image, "max_new_tokens": MAX_NEW_TOKENS, "ignore_eos": True, **extra}


async def stream_one(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    events = []
    async with http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    parsed = [json.loads(e) for e in events[:-1]]
    tokens, done = parsed[:-1], parsed[-1]
    assert done["type"] == "done", done
    return {
        "token_ids": [t["token_id"] for t in tokens],
        "text": "".join(t["text"] for t in tokens),
        "done": done,
    }


def test_concurrent_streams_equal_solo_runs(server: str) -> None:
    before = metrics(server)

    async def run_all() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=NUM_CONCURRENT)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(stream_one(http, request_body(i)) for i in range(NUM_CONCURRENT)))

    together = asyncio.run(run_all())
    after_batch = metrics(server)
    for i, streamed in enumerate(together):
        assert len(streamed["token_ids"]) == MAX_NEW_TOKENS
        alone = httpx.post(f"{server}/generate", json=request_body(i, stream=False), timeout=60).json()
        assert alone["token_ids"] == streamed["token_ids"], f"request {i} differs when batched"
        assert alone["text"] == streamed["text"]
        assert streamed["done"]["usage"]["image_tokens"] > 0
    # the 32 requests really were batched (several per decode step)
    steps = metric(after_batch, "lightvlm_batch_size_count") - metric(before, "lightvlm_batch_size_count")
    rows = metric(after_batch, "lightvlm_batch_size_sum") - metric(before, "lightvlm_batch_size_sum")
    assert rows / steps > 2


def test_openai_client_stream_and_not(server: str) -> None:
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    model = oai.models.list().data[0].id
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": data_url(image_bytes((10, 200, 10)))}},
                {"type": "text", "text": "What is in the picture?"},
            ],
        }
    ]
    kwargs: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": 5, "temperature": 0}
    completion = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == completion.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == completion.usage.completion_tokens <= 5
    assert completion.usage.prompt_tokens > 0
    seeded = [
        oai.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=1.0, seed=11)
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


def test_disconnect_mid_stream_frees_the_row(server: str) -> None:
    async def start_and_leave() -> None:
        async with httpx.AsyncClient(base_url=server, timeout=60) as http:
            body = request_body(1, max_new_tokens=1000)
            async with http.stream("POST", "/generate", json=body) as response:
                lines = response.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                running = metrics(server)
                assert metric(running, "lightvlm_requests_running") == 1
                assert metric(running, "lightvlm_kv_cache_bytes") > 0

    before = metric(metrics(server), "lightvlm_requests_total", finish_reason="cancelled")
    asyncio.run(start_and_leave())

    def idle() -> bool:
        m = metrics(server)
        return metric(m, "lightvlm_requests_running") == 0 and metric(m, "lightvlm_kv_cache_bytes") == 0

    wait_for(idle, timeout=30)
    after = metrics(server)
    assert metric(after, "lightvlm_kv_cache_tokens") == 0
    assert metric(after, "lightvlm_requests_total", finish_reason="cancelled") == before + 1


def test_metrics_after_traffic(server: str) -> None:
    httpx.post(f"{server}/generate", json=request_body(3, stream=False), timeout=60)
    m = metrics(server)
    assert metric(m, "lightvlm_model_info", family="llava", device="cpu", dtype="float32") == 1
    assert metric(m, "lightvlm_requests_total", finish_reason="length") >= 1
    assert metric(m, "lightvlm_prompt_tokens_total") > 0 and metric(m, "lightvlm_generation_tokens_total") > 0
    assert metric(m, "lightvlm_image_tokens_total", stage="input") > 0
    assert metric(m, "lightvlm_image_tokens_total", stage="kept") > 0
    for hist in (
        "prefill_seconds",
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "e2e_request_latency_seconds",
        "queue_time_seconds",
        "batch_size",
    ):
        assert metric(m, f"lightvlm_{hist}_count") > 0, hist
    for gauge in ("requests_running", "requests_waiting", "kv_cache_bytes", "kv_cache_tokens"):
        assert metric(m, f"lightvlm_{gauge}") == 0, gauge


def test_queue_bound_answers_429(model_dir: Path) -> None:
    settings = make_settings(model=str(model_dir), device="cpu", max_batch_size=1, max_queue=1, warmup=False)
    with live_server(create_app(settings)) as base_url:
        wait_for(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=180)

        async def main() -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
                long = request_body(0, max_new_tokens=1000)
                async with http.stream("POST", "/generate", json=long) as running:
                    lines = running.aiter_lines()  # keep a reference: a dropped iterator closes the stream
                    await anext(lines)  # the request now holds the only batch row
                    async with http.stream("POST", "/generate", json=long) as waiting:
                        assert waiting.status_code == 200  # queued
                        rejected = await http.post("/generate", json=request_body(1, stream=False))
                        assert rejected.status_code == 429, rejected.text
                        assert rejected.json()["error"]["type"] == "queue_full"
                        assert "retry-after" in rejected.headers

        asyncio.run(main())
        m = metrics(base_url)
        assert metric(m, "lightvlm_requests_rejected_total", reason="queue_full") == 1
        wait_for(lambda: metric(metrics(base_url), "lightvlm_requests_running") == 0, timeout=30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_lightvlm_serve_command(model_dir: Path, tmp_path: Path) -> None:
    """`lightvlm serve` (app.main.run_server) in its own process: ready, JSON logs, clean exit."""
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {**os.environ, "LIGHTVLM_WARMUP": "false", "OMP_NUM_THREADS": "1", "LIGHTVLM_API_KEY": ""}
    command = [sys.executable, "-m", "app.cli", "serve", "--model", str(model_dir)]
    command += ["--device", "cpu", "--port", str(port)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        base_url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            try:
                return httpx.get(f"{base_url}/ready").status_code == 200
            except httpx.TransportError:
                return process.poll() is None and False

        wait_for(ready, timeout=120)
        response = httpx.post(
            f"{base_url}/generate",
            json={"prompt": "hi", "max_new_tokens": 2, "stream": False},
            headers={"X-Request-ID": "serve-test-1"},
        )
        assert response.status_code == 200 and response.headers["x-request-id"] == "serve-test-1"
    finally:
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0  # Ctrl-C is a normal stop
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    access = [e for e in entries if e.get("path") == "/generate"]
    assert access and access[0]["request_id"] == "serve-test-1" and access[0]["status"] == 200


def test_lightvlm_serve_exits_1_when_the_model_cannot_load(tmp_path: Path) -> None:
    broken = tmp_path / "broken"  # passes the CLI's checks (a directory with a config), fails to load
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llava"}')
    env = {**os.environ, "LIGHTVLM_API_KEY": ""}
    command = [
        sys.executable,
        "-m",
        "app.cli",
        "serve",
        "--model",
        str(broken),
        "--device",
        "cpu",
        "--port",
        str(free_port()),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 1, result.stderr[-2000:]
