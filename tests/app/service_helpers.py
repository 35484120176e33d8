"""Helpers for the service tests: settings, a live uvicorn server, images, SSE parsing."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import uvicorn
from PIL import Image
from starlette.types import ASGIApp

from app.connections import http_protocol
from app.settings import Settings


class _InitOnlySettings(Settings):
    @classmethod
    def settings_customise_sources(
        cls, settings_cls: Any, init_settings: Any, **sources: Any
    ) -> tuple[Any, ...]:
        return (init_settings,)  # ignore LIGHTVLM_* variables of the environment running the tests


def make_settings(**overrides: Any) -> Settings:
    """Settings for tests: the defaults plus `overrides`, whatever the environment says; the decode
    step eager (compiling it would add seconds to every engine start; tests/core/test_compiled.py
    covers it)."""
    return _InitOnlySettings(**{"request_timeout_s": 30.0, "compile": False, **overrides})


@contextlib.contextmanager
def live_server(app: ASGIApp, http: str | type[asyncio.Protocol] | None = None) -> Iterator[str]:
    """Run `app` under uvicorn on a free loopback port in a thread; yields the base URL. The HTTP
    protocol is `lightvlm serve`'s (bounded heads, the default limits) unless `http` names another."""
    if http is None:
        defaults = Settings.model_fields
        http = http_protocol(defaults["header_timeout_s"].default, defaults["max_header_bytes"].default)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on", http=http)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (32, 24), fmt: str = "PNG"
) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(raw).decode()}"


def parse_sse(text: str) -> list[Any]:
    """SSE body -> list of parsed `data:` payloads ("[DONE]" kept as the string)."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def read_answer(sock: socket.socket) -> bytes:
    """One HTTP response with a Content-Length body, read off a raw socket (the connection may
    stay open after it)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < content_length(data):
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return data


def content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise AssertionError(data)
