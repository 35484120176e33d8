"""Bad inputs against the real engine (tiny llava) over real HTTP: each gets its documented 4xx,
never a 5xx, while a long greedy stream runs beside them and ends exactly as it does alone.

The battery itself is in bad_inputs.py; the image-decoding unit tests are in test_service_images.py.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from bad_inputs import LIMITS, Case, cases, data_url, encode, exif_rotated_jpeg, noise
from prometheus_client.parser import text_string_to_metric_families
from service_helpers import live_server, make_settings, wait_for

from app.images import decode_image_bytes
from app.main import create_app

# Long enough to outlast the battery beside it, with margin: at 1500 one fast failure in ~11 runs
# went unexplained (suspected: the stream ended first, once the engine got faster). Context: 4096.
LONG_TOKENS = 3000


@pytest.fixture(scope="module")
def server(tiny_model_dir: Callable[[str], Path]) -> Iterator[str]:
    settings = make_settings(
        model=str(tiny_model_dir("llava")), device="cpu", dtype="float32", warmup=False, **LIMITS
    )
    with live_server(create_app(settings)) as base_url:
        wait_for(lambda: httpx.get(f"{base_url}/ready").status_code == 200, timeout=120)
        yield base_url


def scrape(base_url: str) -> dict[str, float]:
    """name -> value summed over labels."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics").text):
        for s in family.samples:
            totals[s.name] = totals.get(s.name, 0.0) + s.value
    return totals


async def send(http: httpx.AsyncClient, case: Case) -> httpx.Response:
    return await http.request(case.method, case.path, **case.request)


def long_request() -> dict[str, Any]:
    return {
        "prompt": "Describe everything in this picture.",
        "image": data_url(encode(noise((40, 32)))),
        "max_new_tokens": LONG_TOKENS,
        "ignore_eos": True,
    }


def sse_tokens(lines: list[str]) -> tuple[list[int], dict[str, Any]]:
    payloads = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]", payloads[-3:]
    events = [json.loads(p) for p in payloads[:-1]]
    tokens, done = events[:-1], events[-1]
    assert done["type"] == "done", done
    assert [t["index"] for t in tokens] == list(range(len(tokens)))  # nothing lost or reordered
    return [t["token_id"] for t in tokens], done


def test_bad_inputs_get_documented_4xx_and_leave_a_running_stream_exact(server: str) -> None:
    battery = cases()
    before = scrape(server)

    async def main() -> tuple[list[str], list[httpx.Response], bool]:
        limits = httpx.Limits(max_connections=len(battery) + 2)
        async with httpx.AsyncClient(base_url=server, timeout=120, limits=limits) as http:
            async with http.stream("POST", "/generate", json=long_request()) as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                received = [await anext(lines)]  # the stream holds a batch row now
                responses = await asyncio.gather(*(send(http, case) for case in battery))
                overlapped = scrape(server)["lightvlm_requests_running"] >= 1
                received += [line async for line in lines]
        return received, responses, overlapped

    lines, responses, overlapped = asyncio.run(main())
    assert overlapped, "the long stream ended before the battery: make it longer"
    mismatched = []
    for case, response in zip(battery, responses):
        error_type = response.json()["error"]["type"] if response.status_code != 200 else None
        if (response.status_code, error_type) != (case.status, case.error_type):
            mismatched.append((case.name, response.status_code, response.text[:200]))
    assert not mismatched, mismatched

    # the stream beside them: complete, in order, and token for token what it gives alone
    token_ids, done = sse_tokens(lines)
    assert len(token_ids) == LONG_TOKENS and done["finish_reason"] == "length"
    alone = httpx.post(f"{server}/generate", json={**long_request(), "stream": False}, timeout=120).json()
    assert alone["token_ids"] == token_ids
    # the odd-but-valid images decoded in that crowd answer as they do alone
    for case, response in zip(battery, responses):
        if case.status == 200:
            solo = httpx.request(case.method, f"{server}{case.path}", timeout=60, **case.request)
            assert solo.json()["token_ids"] == response.json()["token_ids"], case.name

    # the service is unharmed: live, ready, idle, and every refusal counted
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/ready").status_code == 200
    after = scrape(server)
    for gauge in ("lightvlm_requests_running", "lightvlm_requests_waiting", "lightvlm_kv_cache_bytes"):
        assert after[gauge] == 0, gauge
    refused = sum(1 for case in battery if case.status != 200)
    rejected = after["lightvlm_requests_rejected_total"] - before.get("lightvlm_requests_rejected_total", 0)
    assert rejected == refused


def read_status(sock: socket.socket) -> int:
    head = b""
    while b"\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            break
        head += chunk
    return int(head.split(b" ", 2)[1])


def test_413_comes_before_the_body_is_read(server: str) -> None:
    host, port = server.removeprefix("http://").split(":")
    limit = LIMITS["max_body_bytes"]
    # a declared length over the limit: answered at once, with no body sent at all
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 10000000000\r\n\r\n"
        )
        started = time.monotonic()
        assert read_status(sock) == 413
        assert time.monotonic() - started < 5
    # chunked, no length: the server stops at the limit and answers while the client still sends
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        piece = 64 * 1024
        chunk = f"{piece:x}\r\n".encode() + b" " * piece + b"\r\n"
        sent = 0
        while sent < 20 * limit and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += piece
        assert read_status(sock) == 413
        assert sent < 4 * limit, f"sent {sent} bytes before the 413"


def test_exif_orientation_puts_pixels_where_they_are_displayed() -> None:
    # 40x20: left half red, right half blue; EXIF 6 = shown rotated 90 degrees clockwise,
    # so upright it is 20x40 with red on top and blue at the bottom
    upright = decode_image_bytes(exif_rotated_jpeg(), max_pixels=10_000)
    assert upright.size == (20, 40)
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
