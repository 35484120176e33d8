"""Graceful shutdown: `lightvlm serve` in its own process gets SIGTERM with two streams in flight.

It stops admitting (port closed, or 503 for what slips in), lets the stream that fits in the
grace period finish, ends the one that does not with an error event just before the grace period
is over, and exits 0 within it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import read_answer, wait_for

# well under the endless stream's time (4000 tokens of the tiny model: ~3.2 s at 0.8 ms a token once
# its decode step got faster, which a 4 s grace no longer cut) and over the short one's (200 tokens)
GRACE_S = 2.0
HEADER_TIMEOUT_S = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def read_stream(http: httpx.AsyncClient, body: dict[str, Any], started: asyncio.Event) -> list[Any]:
    events: list[Any] = []
    async with http.stream("POST", "/generate", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                payload = line[len("data: ") :]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
                started.set()
    return events


async def try_new_request(base_url: str) -> str:
    """What a client arriving after SIGTERM sees: 'refused' (port closed) or the 503's error type."""
    try:
        async with httpx.AsyncClient(base_url=base_url, timeout=5) as http:
            response = await http.post("/generate", json={"prompt": "late", "max_new_tokens": 2})
    except httpx.TransportError:
        return "refused"
    assert response.status_code == 503, response.text
    return response.json()["error"]["type"]


def assert_heads_are_bounded(base_url: str) -> None:
    """`lightvlm serve` runs with bounded request heads (app/connections.py): half a head gets a
    408 once the deadline passes, 100 KB of headers a 431, bytes that are not HTTP a JSON 400, and
    each refusal is counted."""
    port = int(base_url.rsplit(":", 1)[1])
    for head, status, seconds in (
        (b"POST /generate HTTP/1.1\r\nHost: x\r\n", b"408", HEADER_TIMEOUT_S + 5),
        (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000, b"431", 5),
        (b"NOT HTTP AT ALL\r\n\r\n", b"400", 5),
    ):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(head)
            started = time.monotonic()
            answer = read_answer(sock)  # not until the close, which lingers after a refusal
            assert answer.startswith(b"HTTP/1.1 " + status) and time.monotonic() - started < seconds, answer
    families = text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text)
    refused = {s.labels["reason"]: s.value for f in families for s in f.samples
               if s.name == "lightvlm_requests_rejected_total"
               and s.labels["reason"] in ("header_timeout", "header_too_large", "invalid_http")}
    assert refused == {"header_timeout": 1.0, "header_too_large": 1.0, "invalid_http": 1.0}, refused


def test_sigterm_drains_then_exits(tiny_model_dir: Callable[[str], Path], tmp_path: Path) -> None:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "LIGHTVLM_WARMUP": "false",
        "LIGHTVLM_API_KEY": "",
        "LIGHTVLM_SHUTDOWN_GRACE_S": str(GRACE_S),
        "LIGHTVLM_MAX_NEW_TOKENS": "8192",
        "LIGHTVLM_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }
    command = [sys.executable, "-m", "app.cli", "serve", "--model", str(tiny_model_dir("llava"))]
    command += ["--device", "cpu", "--port", str(port)]
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:

        def ready() -> bool:
            try:
                return httpx.get(f"{base_url}/ready").status_code == 200
            except httpx.TransportError:
                assert process.poll() is None, log_path.read_text()[-2000:]
                return False

        wait_for(ready, timeout=120)
        assert_heads_are_bounded(base_url)

        async def main() -> tuple[list[Any], list[Any], list[str], float]:
            short = {"prompt": "short one", "max_new_tokens": 200, "ignore_eos": True}
            endless = {"prompt": "endless one", "max_new_tokens": 4000, "ignore_eos": True}  # within the context (4096)
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:
                started = [asyncio.Event(), asyncio.Event()]
                tasks = [
                    asyncio.create_task(read_stream(http, body, flag))
                    for body, flag in zip((short, endless), started)
                ]
                await asyncio.wait_for(asyncio.gather(*(flag.wait() for flag in started)), 30)
                signalled = time.monotonic()
                process.send_signal(signal.SIGTERM)
                await asyncio.sleep(0.3)
                late = [await try_new_request(base_url) for _ in range(3)]
                done_short, done_endless = await asyncio.gather(*tasks)
            return done_short, done_endless, late, signalled

        short_events, endless_events, late, signalled = asyncio.run(main())
        exit_code = process.wait(GRACE_S + 10)
        exited_after = time.monotonic() - signalled
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    # new requests were refused
    assert all(outcome in ("refused", "not_ready") for outcome in late), late
    # the short stream finished in full
    assert short_events[-1] == "[DONE]" and short_events[-2]["type"] == "done", short_events[-3:]
    assert short_events[-2]["usage"]["completion_tokens"] == 200
    # the endless one got an error event (not a cut connection) before the grace period ended
    assert endless_events[-1] == "[DONE]", endless_events[-3:]
    assert endless_events[-2] == {
        "type": "error",
        "error_type": "not_ready",
        "message": "the server is shutting down",
    }
    assert len(endless_events) - 2 < 4000
    # and the process exited cleanly within the grace period (plus process teardown)
    assert exit_code == 0, log[-3000:]
    assert exited_after < GRACE_S + 3, exited_after
    assert "draining" in log
