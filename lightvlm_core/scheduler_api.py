"""What callers of the scheduler see: its config, stats, observer hooks, errors, and the stream
of one request's events. The batching loop itself is in scheduler.py (which re-exports these).

No HTTP, Prometheus or torch here.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lightvlm_core.errors import LightVLMError
from lightvlm_core.types import (
    ErrorEvent,
    Event,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)

if TYPE_CHECKING:
    from lightvlm_core.engine import PreparedRequest, StepOutput


class QueueFullError(LightVLMError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""

    error_type = "queue_full"


class SchedulerClosedError(LightVLMError):
    """The scheduler is not running (not started yet, or shutting down)."""

    error_type = "not_ready"


class RequestFailedError(LightVLMError):
    """A request ended with an error event (time-out, engine failure, ...)."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.error_type = event.error_type


class RequestStatus(enum.IntEnum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    # Everything after RUNNING is a finished status.
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_CANCELLED = enum.auto()
    FINISHED_ERROR = enum.auto()

    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING


class EngineLike(Protocol):
    """What the scheduler needs from `lightvlm_core.engine.Engine` (fakes implement it in tests)."""

    def prepare(self, request: GenerationRequest) -> PreparedRequest: ...
    def add(self, prepared: list[PreparedRequest]) -> list[StepOutput]: ...
    def step(self) -> list[StepOutput]: ...
    def remove(self, request_id: str) -> None: ...
    def remove_all(self) -> None: ...
    def kv_cache_bytes(self) -> int: ...
    def kv_cache_tokens(self) -> int: ...


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8
    """Most requests decoded together in one step."""
    max_queue: int = 64
    """Most requests waiting for a free batch row (beyond the free rows); more get QueueFullError."""
    request_timeout_s: float | None = 300.0
    """Arrival -> done limit per request; None: no limit."""
    prepare_workers: int = 2
    """Threads running `engine.prepare` (CPU: templating, tokenising, image preprocessing)."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= 0")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s}) must be > 0 or None")
        if self.prepare_workers < 1:
            raise ValueError(f"prepare_workers ({self.prepare_workers}) must be >= 1")


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0  # queued for admission, including requests still being prepared
    kv_cache_bytes: int = 0
    kv_cache_tokens: int = 0


class SchedulerObserver:
    """Metric hooks, called on the engine thread. Override what you need; the defaults do nothing.
    An exception raised by a hook is logged and ignored: metrics never fail a request."""

    def on_admitted(self, queue_s: float, prefill_s: float, num_prompt_tokens: int) -> None:
        """A request joined the running batch after `queue_s` waiting and a `prefill_s` prefill."""

    def on_token(self, ttft_s: float | None, itl_s: float | None) -> None:
        """A token was streamed: `ttft_s` for a request's first token, else `itl_s` since its last."""

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        """A request left the scheduler (`finish_reason`: stop, length, cancelled or error)."""

    def on_step(self, batch_size: int) -> None:
        """One decode step ran over `batch_size` requests."""

    def on_engine_counters(self, evicted_tokens: int, image_tokens_in: int, image_tokens_kept: int) -> None:
        """Increments of the engine's cumulative counters since the last call."""


class _Canceller(Protocol):
    def cancel(self, request_id: str) -> None: ...


class RequestStream:
    """The events of one submitted request, as an async iterator. Ends after done or error."""

    def __init__(self, scheduler: _Canceller, request_id: str, num_prompt_tokens: int) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._scheduler = scheduler
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = False

    def cancel(self) -> None:
        """Ask the scheduler to drop this request (no-op once finished)."""
        if not self.finished:
            self._scheduler.cancel(self.request_id)

    async def __aiter__(self) -> AsyncIterator[Event]:
        while not self.finished:
            event = await self._queue.get()
            if not isinstance(event, TokenEvent):
                self.finished = True
            yield event

    async def collect(self) -> GenerationResult:
        """Wait for the whole generation; raises RequestFailedError if it ended with an error."""
        texts: list[str] = []
        token_ids: list[int] = []
        async for event in self:
            if isinstance(event, TokenEvent):
                texts.append(event.text)
                token_ids.append(event.token_id)
            elif isinstance(event, ErrorEvent):
                raise RequestFailedError(event)
            else:
                return GenerationResult(
                    "".join(texts), token_ids, event.finish_reason, event.usage, event.timings
                )
        raise RequestFailedError(ErrorEvent("internal_error", "stream ended without a done event"))

    def _deliver(self, event: Event) -> None:  # on the stream's event loop
        self._queue.put_nowait(event)


def deliver_all(items: list[tuple[RequestStream, Event]]) -> None:
    """Runs on a stream's event loop (scheduled by the engine thread)."""
    for stream, event in items:
        stream._deliver(event)
