"""Round 2 of the reliability battery (issue 19), against the real engine (tiny llava) over real
HTTP, each with a long greedy stream beside it that must end exactly as it does alone.

Classes here: 1 numeric ranges, 2 caps on every route, 3 parse errors, 5 unsupported OpenAI
parameters (400), 6 the API key before the body (cases in bad_inputs_round2.py); 4 aborted
uploads; 8 trickling bodies and the cap on incomplete uploads; 2 /health while big bodies parse.
Images (7) and n/logprobs (5) are in test_reliability_round2_openai.py and _images.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from bad_inputs_round2 import ROUND2, Case, round2_cases
from round2_helpers import (
    AUTH,
    beside_long_stream,
    idle_gauges,
    long_alone,
    metric,
    round2_server,
    scrape,
    tree_rss_bytes,
)

TRICKLE_TIMEOUT_S = ROUND2["body_read_timeout_s"]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Callable[[str], Path]) -> Iterator[str]:
    with round2_server(tiny_model_dir("llava")) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def alone(server: str) -> list[int]:
    """The long stream's tokens with nothing beside it."""
    return long_alone(server)


async def send(http: httpx.AsyncClient, case: Case) -> httpx.Response:
    request = dict(case.request)
    if case.auth:
        request["headers"] = {**AUTH, **request.get("headers", {})}
    return await http.request(case.method, case.path, **request)


def mismatches(battery: list[Case], responses: list[httpx.Response]) -> list[tuple[str, int, str]]:
    wrong = []
    for case, response in zip(battery, responses):
        error_type = response.json()["error"]["type"] if response.status_code != 200 else None
        if (response.status_code, error_type) != (case.status, case.error_type):
            wrong.append((case.name, response.status_code, response.text[:200]))
    return wrong


def test_battery_three_times_leaves_the_stream_exact_and_memory_flat(server: str, alone: list[int]) -> None:
    battery = round2_cases()
    assert len({c.cls for c in battery}) == 5 and len(battery) >= 60
    before = scrape(server)
    rss = []
    for _ in range(3):

        async def fire(http: httpx.AsyncClient) -> list[httpx.Response]:
            return await asyncio.gather(*(send(http, case) for case in battery))

        tokens, responses, overlapped = asyncio.run(beside_long_stream(server, fire))
        assert overlapped, "the long stream ended before the battery: make it longer"
        assert not mismatches(battery, responses), mismatches(battery, responses)
        assert tokens == alone
        rss.append(tree_rss_bytes())
    after = scrape(server)
    refused = 3 * sum(1 for case in battery if case.status != 200)
    rejected = "lightvlm_requests_rejected_total"
    assert metric(after, rejected) - metric(before, rejected) == refused
    assert idle_gauges(server) == dict.fromkeys(idle_gauges(server), 0.0)
    assert long_alone(server) == alone  # a normal request answers as before
    growth_mb = (rss[2] - rss[1]) / 2**20
    print(f"round-2 battery: {len(battery)} cases x 3; RSS after each: {[round(r / 2**20) for r in rss]} MB")
    assert growth_mb < 40, rss


def raw_socket(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def head(path: str, length: int, content_type: str = "application/json", auth: bool = True) -> bytes:
    key = f"Authorization: {AUTH['Authorization']}\r\n" if auth else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n{key}Content-Type: {content_type}\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def read_response(sock: socket.socket) -> tuple[int, bytes]:
    """Status and everything until the server closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return int(data.split(b" ", 2)[1]), data


MULTIPART = "multipart/form-data; boundary=XB"
HALF_BODIES = [  # (path, content type, the first half of a body that declares twice its length)
    ("/generate", "application/json", b'{"prompt": "' + b"a" * 5000),
    ("/v1/chat/completions", "application/json", b'{"messages": [{"role": "user", "content": "' + b"b" * 5000),
    ("/generate", MULTIPART, b'--XB\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n' + b"c" * 5000),
]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if all(r is not record for r in self.records):  # a record reaches several of our loggers
            self.records.append(record)


@pytest.fixture
def records() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(), logging.getLogger("uvicorn.error"), logging.getLogger("app")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.INFO)
    yield handler
    for lg, level in zip(loggers, levels):
        lg.removeHandler(handler)
        lg.setLevel(level)


def test_aborted_uploads_are_logged_at_info_and_counted_apart(
    server: str, alone: list[int], records: Records
) -> None:
    before = metric(scrape(server), "lightvlm_requests_rejected_total", "client_aborted")

    async def abort_all(http: httpx.AsyncClient) -> None:
        for _ in range(2):
            for path, content_type, half in HALF_BODIES:
                with raw_socket(server) as sock:
                    sock.sendall(head(path, 2 * len(half), content_type) + half)
        await asyncio.sleep(0)

    tokens, _, _ = asyncio.run(beside_long_stream(server, abort_all))
    assert tokens == alone
    def counted() -> float:
        return metric(scrape(server), "lightvlm_requests_rejected_total", "client_aborted") - before

    deadline = time.monotonic() + 10
    while counted() < 2 * len(HALF_BODIES) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == 2 * len(HALF_BODIES)
    assert not [r for r in records.records if r.levelno >= logging.ERROR], [r.getMessage() for r in records.records]
    aborted = [r for r in records.records if "closed the connection" in r.getMessage()]
    assert len(aborted) == 2 * len(HALF_BODIES) and all(r.levelno == logging.INFO for r in aborted)
    statuses = [getattr(r, "status", None) for r in records.records if r.name == "app.access"]
    assert not [s for s in statuses if s is not None and s >= 500], statuses


def test_trickling_bodies_get_408_and_incomplete_uploads_are_capped(server: str, alone: list[int]) -> None:
    cap = 64  # ROUND2["max_incomplete_uploads"]

    async def trickle(http: httpx.AsyncClient) -> tuple[list[tuple[int, float]], int, int]:
        holders = []
        for i in range(cap):  # every upload slot held by a client that sent half a body
            path, content_type, half = HALF_BODIES[i % len(HALF_BODIES)]
            sock = raw_socket(server)
            sock.sendall(head(path, 2 * len(half), content_type) + half)
            holders.append(sock)
        await asyncio.sleep(0.5)
        over_cap = await http.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}, headers=AUTH)
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        answers = []
        for sock in holders:
            status, _ = await loop.run_in_executor(None, read_response, sock)
            answers.append((status, time.monotonic() - started))
            sock.close()
        after = await http.post("/generate", json={"prompt": "hi", "max_new_tokens": 2, "stream": False}, headers=AUTH)
        return answers, over_cap.status_code, after.status_code

    tokens, (answers, over_cap, after), _ = asyncio.run(beside_long_stream(server, trickle))
    assert tokens == alone
    assert over_cap == 429  # the cap held: no new upload while 64 were incomplete
    assert {status for status, _ in answers} == {408}
    assert max(waited for _, waited in answers) < TRICKLE_TIMEOUT_S + 5
    assert after == 200  # the slots came back
    assert idle_gauges(server)["lightvlm_requests_running"] == 0


def test_one_byte_at_a_time_is_cut_at_the_read_timeout(server: str) -> None:
    with raw_socket(server) as sock:
        body = b'{"prompt": "' + b"z" * 100 + b'"}'
        sock.sendall(head("/v1/chat/completions", len(body)))
        started = time.monotonic()
        sock.settimeout(0.3)
        sent, status = 0, None
        while status is None and time.monotonic() - started < TRICKLE_TIMEOUT_S + 10:
            try:
                sock.sendall(body[sent : sent + 1])
                sent += 1
                data = sock.recv(65536)
                status = int(data.split(b" ", 2)[1]) if data else -1
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                status = -1
        assert status == 408 and TRICKLE_TIMEOUT_S - 0.5 < time.monotonic() - started < TRICKLE_TIMEOUT_S + 5


def test_health_answers_while_big_bodies_are_parsed(server: str) -> None:
    """50,000 empty messages (1.6 MB) x 12 at once. json.loads holds the GIL (~0.24 s per body
    here), so big bodies are parsed off the event loop and one at a time: /health waits for at most
    a few of them, not all twelve (it took 3.5 s with twelve parsed at once)."""
    body = json.dumps({"messages": [{"role": "user", "content": ""}] * 50_000, "max_tokens": 2}).encode()
    headers = {**AUTH, "content-type": "application/json"}

    async def main() -> tuple[list[int], list[float]]:
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            send = lambda: http.post("/v1/chat/completions", content=body, headers=headers)  # noqa: E731
            big = [asyncio.create_task(send()) for _ in range(12)]
            gaps = []
            while not all(task.done() for task in big):
                started = time.monotonic()
                assert (await http.get("/health")).status_code == 200
                gaps.append(time.monotonic() - started)
                await asyncio.sleep(0.02)
            return [(await task).status_code for task in big], gaps

    statuses, gaps = asyncio.run(main())
    assert statuses == [422] * 12
    print(f"/health during 12 big bodies: {len(gaps)} probes, slowest {max(gaps) * 1e3:.0f} ms")
    assert max(gaps) < 1.5, gaps
