"""uvicorn's HTTP protocols with a deadline for each request's head (request line and headers).

uvicorn bounds the idle time between two requests on a connection (keep-alive) but not the time a
client takes to send a request's head: a connection that sends nothing, or half a head, stays open
for ever, and enough of them exhaust the process's file descriptors (slowloris). With these
protocols a connection must complete each head within `head_timeout_s` of connecting or of its
previous response. Past it, a connection that sent part of a head gets a 408 and is closed; one
that sent nothing is closed quietly (a browser's unused preconnection looks like that).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from app.errors import error_body

logger = logging.getLogger("app.connections")

HEAD_TIMEOUT_REASON = "header_timeout"  # lightvlm_requests_rejected_total{reason=...}


def _base_protocol(kind: Literal["auto", "h11", "httptools"]) -> type[asyncio.Protocol]:
    """uvicorn's protocol class for `kind`; "auto" picks httptools when installed, as uvicorn does."""
    if kind in ("auto", "httptools"):
        try:
            from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

            return HttpToolsProtocol
        except ImportError:
            if kind == "httptools":
                raise
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def _timeout_response(head_timeout_s: float) -> bytes:
    body = json.dumps(error_body("timeout", f"the request head was not received within {head_timeout_s:g}s"))
    return (
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}"
    ).encode()


class _HeadDeadline:
    """Mixin over a uvicorn HTTP protocol (uses its `loop`, `transport`, `cycle` and hooks). A new
    request cycle (uvicorn makes one when a head is complete) is what ends the wait."""

    head_timeout_s: float
    on_timeout: Callable[[], None] | None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: Any) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)  # type: ignore[misc]
        self._await_head()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is not None:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self._head_timer is not None and self.cycle is not self._cycle_before:
            self._stop_waiting()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # a pipelined request may have started already; otherwise the next head is awaited
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)  # type: ignore[misc]

    def _await_head(self) -> None:
        self._stop_waiting()
        self._cycle_before, self._head_bytes = self.cycle, 0
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._deadline_passed)

    def _stop_waiting(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _deadline_passed(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.cycle is not self._cycle_before:
            return
        if self._head_bytes:
            self.transport.write(_timeout_response(self.head_timeout_s))
            logger.info(
                "closed a connection whose request head was incomplete after %gs", self.head_timeout_s,
                extra={"client": _peer(self.transport), "bytes": self._head_bytes},
            )
            if self.on_timeout is not None:
                self.on_timeout()
        self.transport.close()


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def http_protocol(
    head_timeout_s: float,
    on_timeout: Callable[[], None] | None = None,
    kind: Literal["auto", "h11", "httptools"] = "auto",
) -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class (for `uvicorn.Config(http=...)`) with the head deadline;
    `on_timeout` is called for each 408 it sends."""
    base = _base_protocol(kind)
    attrs = {"head_timeout_s": head_timeout_s, "on_timeout": staticmethod(on_timeout) if on_timeout else None}
    return type(f"HeadDeadline{base.__name__}", (_HeadDeadline, base), attrs)
