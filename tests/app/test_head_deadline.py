"""Bounded request heads (app/connections.py) under real uvicorn, both HTTP implementations: a
connection that sends nothing, or half a head, is closed once the deadline passes (408 for the half
head); a head over the size limit gets a 431, bytes that are not HTTP a JSON 400; a head completed
in time, a slow body, a response longer than the deadline, a keep-alive connection's next request,
a pipelined request and the rest of a body answered early are untouched. The end-to-end check
through `lightvlm serve` is in test_reliability_shutdown.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from service_helpers import live_server, read_answer
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app.connections import http_protocol

DEADLINE_S = 0.6
MAX_HEAD = 4096
KINDS = ["h11", "httptools"]


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


async def slow(request: Request) -> StreamingResponse:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(4):
            await asyncio.sleep(DEADLINE_S / 2)
            yield f"{i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


async def early(request: Request) -> JSONResponse:
    return JSONResponse({"read": False})  # answers without reading the body (as a 415 does)


def app() -> Starlette:
    routes = [Route("/echo", echo, methods=["POST"]), Route("/early", early, methods=["POST"]), Route("/slow", slow)]
    return Starlette(routes=routes)


def connect(base_url: str) -> socket.socket:
    host, port = base_url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=DEADLINE_S * 8)


def read_until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes; and how long that took."""
    started, data = time.monotonic(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - started


def request(path: str, body: bytes = b"", method: str = "POST") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


@pytest.mark.parametrize("kind", KINDS)
def test_silent_and_half_head_connections_are_closed_at_the_deadline(kind: str) -> None:
    refused: list[str] = []
    protocol = http_protocol(DEADLINE_S, MAX_HEAD, refused.append, kind=kind)
    with live_server(app(), http=protocol) as base_url:  # type: ignore[arg-type]
        with connect(base_url) as silent, connect(base_url) as half:
            started = time.monotonic()
            half.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")
            quiet, quiet_after = read_until_closed(silent)
            answer, answer_after = read_answer(half), time.monotonic() - started
        assert quiet == b"" and DEADLINE_S * 0.8 < quiet_after < DEADLINE_S * 4
        assert answer.startswith(b"HTTP/1.1 408 ") and DEADLINE_S * 0.8 < answer_after < DEADLINE_S * 4, answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "timeout"
        assert refused == ["header_timeout"]  # the 408 is counted; the silent connection is not


@pytest.mark.parametrize("kind", KINDS)
def test_a_head_over_the_size_limit_gets_431(kind: str) -> None:
    refused: list[str] = []
    # h11 has its own, smaller limit (16 KiB: a 400); under it ours applies
    protocol = http_protocol(30.0, MAX_HEAD, refused.append, kind=kind)
    with live_server(app(), http=protocol) as base_url:  # type: ignore[arg-type]
        with connect(base_url) as sock:
            sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
            for i in range(MAX_HEAD // 100 + 1):  # more than MAX_HEAD bytes of headers, in pieces
                sock.sendall(b"X-Filler-%03d: " % i + b"f" * 84 + b"\r\n")
            answer = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 431 "), answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "header_too_large"
            sock.sendall(b"X-More: " + b"m" * 10_000 + b"\r\n")  # dropped: the answer is not lost
            assert read_until_closed(sock)[0] == b""
        assert refused == ["header_too_large"]
        # a head just under the limit, and a body larger than it, go through
        with connect(base_url) as sock:
            body = b"b" * (4 * MAX_HEAD)
            head = request("/echo", body)[: -len(body)]
            padding = b"X-Pad: " + b"p" * (MAX_HEAD - len(head) - 64) + b"\r\n"
            sock.sendall(head[:-2] + padding + b"\r\n" + body)
            assert read_answer(sock).endswith(b'{"size":%d}' % len(body))


@pytest.mark.parametrize("kind", KINDS)
def test_bytes_that_are_not_http_get_a_json_400(kind: str) -> None:
    refused: list[str] = []
    protocol = http_protocol(30.0, MAX_HEAD, refused.append, kind=kind)
    with live_server(app(), http=protocol) as base_url:  # type: ignore[arg-type]
        for garbage in (b"HELLO THERE\r\n\r\n", b"GET /echo HTTP/1.1\r\nHost: x\x00y\r\n\r\n"):
            with connect(base_url) as sock:
                sock.sendall(garbage)
                answer = read_answer(sock)
            assert answer.startswith(b"HTTP/1.1 400 "), answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "invalid_request"
    assert refused == ["invalid_http", "invalid_http"]


@pytest.mark.parametrize("kind", KINDS)
def test_requests_in_time_are_untouched(kind: str) -> None:
    with live_server(app(), http=http_protocol(DEADLINE_S, MAX_HEAD, kind=kind)) as base_url:  # type: ignore[arg-type]
        with connect(base_url) as sock:
            # a head sent in pieces within the deadline, then a body slower than the deadline
            for piece in (b"POST /echo HTTP/1.1\r\n", b"Host: x\r\n", b"Content-Length: 4\r\n\r\n"):
                sock.sendall(piece)
                time.sleep(DEADLINE_S / 4)
            sock.sendall(b"ab")
            time.sleep(DEADLINE_S * 1.5)
            sock.sendall(b"cd")
            assert b'{"size":4}' in sock.recv(65536)
            # the same connection, idle for less than the deadline, then a response longer than it
            time.sleep(DEADLINE_S / 2)
            sock.sendall(request("/slow", method="GET"))
            streamed = b""
            while not streamed.endswith(b"0\r\n\r\n"):  # chunked: the terminating chunk
                streamed += sock.recv(65536)
            assert b"0\n" in streamed and b"3\n" in streamed
            # two pipelined requests in one write, the first slower than the deadline
            sock.sendall(request("/slow", method="GET") + request("/echo", b"xyz"))
            both = b""
            while b'{"size":3}' not in both:
                chunk = sock.recv(65536)
                assert chunk, both
                both += chunk
            assert both.count(b"HTTP/1.1 200") == 2
            # answered before its body was read: the rest of the body (larger than a head may be)
            # is dropped as it comes, and the next request on the connection is served
            body = b"z" * (3 * MAX_HEAD)
            sock.sendall(request("/early", body)[: -len(body)])
            assert read_answer(sock).endswith(b'{"read":false}')
            sock.sendall(body)
            sock.sendall(request("/echo", b"after"))
            assert read_answer(sock).endswith(b'{"size":5}')
