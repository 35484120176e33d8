"""The request-head deadline (app/connections.py) under real uvicorn, both HTTP implementations:
a connection that sends nothing, or half a head, is closed once the deadline passes (408 for the
half head); a head completed in time, a response longer than the deadline, a keep-alive
connection's next request and a pipelined request are untouched. The end-to-end check through
`lightvlm serve` is in test_reliability_shutdown.py."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest
from service_helpers import live_server
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from app.connections import http_protocol

DEADLINE_S = 0.6
KINDS = ["h11", "httptools"]


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"size": len(await request.body())})


async def slow(request: Request) -> StreamingResponse:
    async def chunks():  # type: ignore[no-untyped-def]
        for i in range(4):
            await asyncio.sleep(DEADLINE_S / 2)
            yield f"{i}\n".encode()

    return StreamingResponse(chunks(), media_type="text/plain")


def app() -> Starlette:
    return Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/slow", slow)])


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
    timeouts: list[int] = []
    protocol = http_protocol(DEADLINE_S, lambda: timeouts.append(1), kind=kind)
    with live_server(app(), http=protocol) as base_url:  # type: ignore[arg-type]
        with connect(base_url) as silent, connect(base_url) as half:
            half.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Le")
            quiet, quiet_after = read_until_closed(silent)
            answer, answer_after = read_until_closed(half)
        assert quiet == b"" and DEADLINE_S * 0.8 < quiet_after < DEADLINE_S * 4
        assert answer.startswith(b"HTTP/1.1 408 ") and answer_after < DEADLINE_S * 4, answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["type"] == "timeout"
        assert timeouts == [1]  # the 408 is counted; the silent connection is not


@pytest.mark.parametrize("kind", KINDS)
def test_requests_in_time_are_untouched(kind: str) -> None:
    with live_server(app(), http=http_protocol(DEADLINE_S, kind=kind)) as base_url:  # type: ignore[arg-type]
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
