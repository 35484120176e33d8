"""uvicorn's HTTP protocols with bounded request heads (request line and headers): in time and in size.

uvicorn bounds the idle time between two requests on a connection (keep-alive) but not the time a
client takes to send a request's head: a connection that sends nothing, or half a head, stays open
for ever, and enough of them exhaust the process's file descriptors (slowloris). Nor, with
httptools, the head's size: a 4 MB header or 100,000 headers were parsed and answered. With these
protocols a connection must complete each head within `head_timeout_s` of connecting or of its
previous response, in at most `max_head_bytes`. Past the deadline, a connection that sent part of a
head gets a 408; one that sent nothing is closed quietly (a browser's unused preconnection looks
like that). Past the size, a 431. Bytes the parser refuses get a 400 in the service's JSON error
shape (uvicorn's is plain text). Each time the connection then closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any, Literal

from app.errors import error_body

logger = logging.getLogger("app.connections")

# lightvlm_requests_rejected_total{reason=...}; also the 431's error type
HEAD_TIMEOUT_REASON, HEAD_TOO_LARGE_REASON = "header_timeout", "header_too_large"
NOT_HTTP_REASON = "invalid_http"  # bytes the HTTP parser refused


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


def _answer(status: str, error_type: str, message: str) -> bytes:
    body = json.dumps(error_body(error_type, message))
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n{body}"
    ).encode()


# After a refusal, what the client still sends is read and dropped for this long / this many bytes
# before the connection closes: closing with unread data would reset it and lose the answer.
LINGER_S = 2.0
LINGER_BYTES = 1024 * 1024


class _BoundedHead:
    """Mixin over a uvicorn HTTP protocol (uses its `loop`, `transport`, `cycle` and hooks). A new
    request cycle (uvicorn makes one when a head is complete) is what ends the wait for a head."""

    head_timeout_s: float
    max_head_bytes: int
    on_refuse: Callable[[str], None] | None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def connection_made(self, transport: Any) -> None:
        self._head_timer: asyncio.TimerHandle | None = None
        self._lingering = False
        super().connection_made(transport)  # type: ignore[misc]
        self._await_head(counting=True)

    def data_received(self, data: bytes) -> None:
        if self._lingering:  # refused already: dropped unparsed
            self._linger_bytes += len(data)
            if self._linger_bytes > LINGER_BYTES:
                self.transport.close()
            return
        counting = self._head_timer is not None and self._counting
        if counting:
            self._head_bytes += len(data)
        super().data_received(data)  # type: ignore[misc]
        if self._head_timer is None:
            return
        if self.cycle is not self._cycle_before:
            self._stop_waiting()
        elif counting and self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
            message = f"the request head is larger than {self.max_head_bytes} bytes"
            self._refuse(_answer("431 Request Header Fields Too Large", HEAD_TOO_LARGE_REASON, message),
                         HEAD_TOO_LARGE_REASON)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        # a pipelined request may have started already; otherwise the next head is awaited. When the
        # answer came before the request's body was read in full, uvicorn drops the rest of it as it
        # arrives: those bytes are not a head, so only the deadline applies then.
        if not self.transport.is_closing() and self.cycle.response_complete:
            self._await_head(counting=not self.cycle.more_body)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refuses (plain text there): the service's JSON error
        shape, counted, and the same lingering close as the other refusals."""
        if self.cycle is not None and not self.cycle.response_complete:  # a response is on the wire
            super().send_400_response(msg)  # type: ignore[misc]
            return
        self._refuse(_answer("400 Bad Request", "invalid_request", msg), NOT_HTTP_REASON)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)  # type: ignore[misc]

    def _await_head(self, counting: bool) -> None:
        self._stop_waiting()
        self._cycle_before, self._head_bytes, self._counting = self.cycle, 0, counting
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
            message = f"the request head was not received within {self.head_timeout_s:g}s"
            self._refuse(_answer("408 Request Timeout", "timeout", message), HEAD_TIMEOUT_REASON)
        else:  # nothing sent (or only the rest of an answered request's body): closed quietly
            self.transport.close()

    def _refuse(self, answer: bytes, reason: str) -> None:
        self._stop_waiting()
        self.transport.write(answer)
        self._lingering, self._linger_bytes = True, 0
        self.loop.call_later(LINGER_S, self.transport.close)
        logger.info("refused a request head (%s)", reason,
                    extra={"client": _peer(self.transport), "bytes": self._head_bytes})
        if self.on_refuse is not None:
            self.on_refuse(reason)


def _peer(transport: asyncio.Transport) -> str:
    peer = transport.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


def http_protocol(
    head_timeout_s: float,
    max_head_bytes: int,
    on_refuse: Callable[[str], None] | None = None,
    kind: Literal["auto", "h11", "httptools"] = "auto",
) -> type[asyncio.Protocol]:
    """A uvicorn HTTP protocol class (for `uvicorn.Config(http=...)`) with bounded heads;
    `on_refuse(reason)` is called for each 400 / 408 / 431 it sends."""
    base = _base_protocol(kind)
    attrs = {
        "head_timeout_s": head_timeout_s,
        "max_head_bytes": max_head_bytes,
        "on_refuse": staticmethod(on_refuse) if on_refuse else None,
    }
    return type(f"BoundedHead{base.__name__}", (_BoundedHead, base), attrs)
