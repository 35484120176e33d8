"""Continuous (iteration-level) batching over one engine, driven by one engine thread.

The engine is not thread-safe, so exactly one thread (the engine thread) calls `add`, `step`
and `remove`. Every iteration of its loop:

1. drains cancellations and time-outs (rows leave the batch, their KV memory is freed);
2. admits waiting requests into the running batch, up to `max_batch_size`, with one batched
   prefill (`engine.add`); if that fails the requests are retried one by one, so a bad request
   fails alone;
3. decodes one token for every running request (`engine.step`) and retires finished ones;
4. hands the events to the asyncio loops that wait for them (`call_soon_threadsafe`).

Callers (the HTTP service, benchmarks) use three things: `await submit(request)` returns a
`RequestStream` (an async iterator of `TokenEvent` ... `DoneEvent | ErrorEvent`), `cancel(id)`,
and `stats()`. `engine.prepare` (tokenisation, image preprocessing) runs in a small thread pool
at submit time, so a bad request raises there, before anything is queued.

This module knows nothing about HTTP or Prometheus: metrics flow out through
`SchedulerObserver` callbacks, invoked on the engine thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from lightvlm_core.errors import InvalidRequestError, LightVLMError
from lightvlm_core.types import (
    DoneEvent,
    ErrorEvent,
    Event,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    Timings,
    TokenEvent,
    Usage,
)

if TYPE_CHECKING:
    from lightvlm_core.engine import PreparedRequest, StepOutput

logger = logging.getLogger(__name__)


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


_STATUS_OF_REASON: dict[str, RequestStatus] = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "cancelled": RequestStatus.FINISHED_CANCELLED,
    "error": RequestStatus.FINISHED_ERROR,
}


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
    """Metric hooks, called on the engine thread. Override what you need; the defaults do nothing."""

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


class RequestStream:
    """The events of one submitted request, as an async iterator. Ends after done or error."""

    def __init__(self, scheduler: Scheduler, request_id: str, num_prompt_tokens: int) -> None:
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


@dataclass(eq=False)
class _Entry:
    request: GenerationRequest
    prepared: PreparedRequest
    stream: RequestStream
    deadline: float | None
    status: RequestStatus = RequestStatus.WAITING
    admitted_at: float | None = None
    prefill_s: float = 0.0
    first_token_at: float | None = None
    last_token_at: float | None = None
    num_tokens: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class _EngineCounters:
    evicted: int = 0
    image_in: int = 0
    image_kept: int = 0


class Scheduler:
    """Owns the engine and the engine thread; see the module docstring."""

    def __init__(
        self,
        engine: EngineLike,
        config: SchedulerConfig | None = None,
        observer: SchedulerObserver | None = None,
    ) -> None:
        self.engine = engine
        self.config = config or SchedulerConfig()
        self.observer = observer or SchedulerObserver()
        self._cond = threading.Condition()
        # Guarded by _cond: shared between the engine thread and submitters.
        self._waiting: deque[_Entry] = deque()
        self._entries: dict[str, _Entry] = {}  # request_id -> waiting or running entry
        self._cancel_ids: set[str] = set()
        self._num_queued = 0  # reserved queue slots: being prepared + waiting
        self._num_running = 0
        self._kv_cache_bytes = 0
        self._kv_cache_tokens = 0
        self._closed = False
        # Engine thread only.
        self._running: dict[str, _Entry] = {}
        self._outbox: list[tuple[RequestStream, Event]] = []
        self._counters = _EngineCounters()
        self._thread: threading.Thread | None = None
        self._prepare_pool = ThreadPoolExecutor(
            self.config.prepare_workers, thread_name_prefix="lightvlm-prepare"
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def warm_up(self, request: GenerationRequest, max_steps: int = 4) -> None:
        """Run one request through prefill and a few decode steps, before `start()`."""
        if self._thread is not None:
            raise RuntimeError("warm_up() must run before start()")
        prepared = self.engine.prepare(request)
        try:
            outputs = self.engine.add([prepared])
            for _ in range(max_steps):
                if any(o.done for o in outputs):
                    break
                outputs = self.engine.step()
        finally:
            self.engine.remove_all()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._counters = self._read_engine_counters()  # warm-up work is not counted
        self._thread = threading.Thread(target=self._run, name="lightvlm-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float | None = 10.0) -> None:
        """Stop the engine thread; requests still in flight end with an error event."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        self._prepare_pool.shutdown(wait=False, cancel_futures=True)

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closed

    # ---- caller API (any thread / event loop) ------------------------------------------------

    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Prepare and enqueue one request. Raises QueueFullError, SchedulerClosedError, or the
        engine's InvalidRequestError / ImageError / PromptTooLongError for bad input."""
        self._reserve_slot(request.request_id)
        loop = asyncio.get_running_loop()
        try:
            prepared = await loop.run_in_executor(self._prepare_pool, self.engine.prepare, request)
            stream = RequestStream(self, request.request_id, prepared.num_prompt_tokens)
            timeout = self.config.request_timeout_s
            deadline = request.arrival_time + timeout if timeout is not None else None
            entry = _Entry(request, prepared, stream, deadline)
            with self._cond:
                if self._closed:
                    raise SchedulerClosedError("the scheduler is shutting down")
                self._waiting.append(entry)
                self._entries[request.request_id] = entry
                self._cond.notify()
        except BaseException:
            with self._cond:
                self._num_queued -= 1
            raise
        return stream

    def cancel(self, request_id: str) -> None:
        """Drop a waiting or running request at the next step (no-op if unknown or finished)."""
        with self._cond:
            if request_id in self._entries:
                self._cancel_ids.add(request_id)
                self._cond.notify()

    def stats(self) -> SchedulerStats:
        with self._cond:
            return SchedulerStats(
                self._num_running, self._num_queued, self._kv_cache_bytes, self._kv_cache_tokens
            )

    def _reserve_slot(self, request_id: str) -> None:
        with self._cond:
            if self._closed or self._thread is None:
                raise SchedulerClosedError("the scheduler is not running")
            if request_id in self._entries:
                raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
            free_rows = max(0, self.config.max_batch_size - self._num_running)
            if self._num_queued >= self.config.max_queue + free_rows:
                raise QueueFullError(f"too many requests waiting ({self._num_queued}); retry later")
            self._num_queued += 1

    # ---- engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._waiting or self._cancel_ids or self._running):
                    self._cond.wait(timeout=1.0)
                if self._closed:
                    break
                cancel_ids, self._cancel_ids = self._cancel_ids, set()
            try:
                self._iterate(cancel_ids)
            except Exception:  # a bug here must not kill the thread and hang every client
                logger.exception("scheduler iteration failed; failing the running requests")
                self._fail_running("internal_error", "internal scheduler error")
                time.sleep(0.01)
            self._refresh_stats()
            self._flush()
        self._close_all()

    def _iterate(self, cancel_ids: set[str]) -> None:
        for request_id in cancel_ids:
            self._finish_early(request_id, DoneEvent("cancelled", Usage(), Timings()))
        self._expire()
        admitted = self._pop_admissible()
        if admitted:
            self._admit(admitted)
            self._flush()
        if self._running:
            batch_size = len(self._running)
            try:
                outputs = self.engine.step()
            except Exception as exc:
                logger.exception("decode step failed for %d requests", batch_size)
                self._fail_running("internal_error", f"decode step failed: {type(exc).__name__}: {exc}")
                return
            self.observer.on_step(batch_size)
            self._apply(outputs)

    def _pop_admissible(self) -> list[_Entry]:
        with self._cond:
            num_free = self.config.max_batch_size - len(self._running)
            admitted = [self._waiting.popleft() for _ in range(min(num_free, len(self._waiting)))]
            self._num_queued -= len(admitted)
        return admitted

    def _admit(self, entries: Sequence[_Entry]) -> None:
        """Batched prefill; on failure retry one by one so only the bad request fails."""
        start = time.monotonic()
        try:
            outputs = self.engine.add([e.prepared for e in entries])
        except Exception as exc:
            if len(entries) > 1:
                logger.warning(
                    "batched prefill of %d requests failed (%s); retrying one by one", len(entries), exc
                )
                for entry in entries:
                    self._admit([entry])
                return
            self._fail(entries[0], exc)
            return
        end = time.monotonic()
        for entry in entries:
            entry.status = RequestStatus.RUNNING
            entry.admitted_at, entry.prefill_s = start, end - start
            self._running[entry.request_id] = entry
            self.observer.on_admitted(
                start - entry.request.arrival_time, end - start, entry.prepared.num_prompt_tokens
            )
        with self._cond:
            self._num_running = len(self._running)
        self._apply(outputs)

    def _apply(self, outputs: list[StepOutput]) -> None:
        now = time.monotonic()
        for out in outputs:
            entry = self._running.get(out.request_id)
            if entry is None:
                continue
            if out.token is not None:
                if entry.first_token_at is None:
                    entry.first_token_at = now
                    self.observer.on_token(now - entry.request.arrival_time, None)
                else:
                    self.observer.on_token(None, now - (entry.last_token_at or now))
                entry.last_token_at = now
                entry.num_tokens += 1
                self._emit(entry, out.token)
            if out.done is not None:
                del self._running[out.request_id]  # the engine already dropped the row
                self._retire(entry, out.done, out.done.finish_reason)
        with self._cond:
            self._num_running = len(self._running)

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            expired = [e for e in self._entries.values() if e.deadline is not None and now >= e.deadline]
        for entry in expired:
            self._finish_early(
                entry.request_id,
                ErrorEvent("timeout", f"request timed out after {self.config.request_timeout_s:g}s"),
            )

    def _finish_early(self, request_id: str, event: DoneEvent | ErrorEvent) -> None:
        """Cancel or time out a waiting or running request."""
        with self._cond:
            entry = self._entries.get(request_id)
            if entry is None:
                return
            if entry.status == RequestStatus.WAITING:
                self._waiting.remove(entry)
                self._num_queued -= 1
        if entry.status == RequestStatus.RUNNING:
            self._running.pop(request_id, None)
            try:
                self.engine.remove(request_id)
            except Exception:
                logger.exception("engine.remove(%s) failed", request_id, extra={"request_id": request_id})
        if isinstance(event, DoneEvent):
            event = DoneEvent(event.finish_reason, self._partial_usage(entry), self._partial_timings(entry))
        self._retire(entry, event, "cancelled" if isinstance(event, DoneEvent) else "error")
        with self._cond:
            self._num_running = len(self._running)

    def _fail(self, entry: _Entry, exc: Exception) -> None:
        if isinstance(exc, LightVLMError):
            event = ErrorEvent(exc.error_type, str(exc))
        else:
            logger.error(
                "request %s failed: %s: %s",
                entry.request_id,
                type(exc).__name__,
                exc,
                extra={"request_id": entry.request_id},
            )
            event = ErrorEvent("internal_error", f"{type(exc).__name__}: {exc}")
        self._running.pop(entry.request_id, None)
        self._retire(entry, event, "error")

    def _fail_running(self, error_type: str, message: str) -> None:
        entries = list(self._running.values())
        self._running.clear()
        try:
            self.engine.remove_all()
        except Exception:
            logger.exception("engine.remove_all() failed")
        for entry in entries:
            self._retire(entry, ErrorEvent(error_type, message), "error")
        with self._cond:
            self._num_running = 0

    def _retire(
        self, entry: _Entry, event: DoneEvent | ErrorEvent, finish_reason: FinishReason | str
    ) -> None:
        entry.status = (
            _STATUS_OF_REASON.get(finish_reason, RequestStatus.FINISHED_ERROR)
            if isinstance(event, DoneEvent)
            else RequestStatus.FINISHED_ERROR
        )
        with self._cond:
            self._entries.pop(entry.request_id, None)
            self._cancel_ids.discard(entry.request_id)
        self.observer.on_finished(finish_reason, time.monotonic() - entry.request.arrival_time)
        self._emit(entry, event)
        if isinstance(event, ErrorEvent) and event.error_type != "timeout":
            logger.info(
                "request %s ended with %s: %s",
                entry.request_id,
                event.error_type,
                event.message,
                extra={"request_id": entry.request_id},
            )

    def _partial_usage(self, entry: _Entry) -> Usage:
        return Usage(prompt_tokens=entry.prepared.num_prompt_tokens, completion_tokens=entry.num_tokens)

    def _partial_timings(self, entry: _Entry) -> Timings:
        now = time.monotonic()
        arrival = entry.request.arrival_time
        admitted = entry.admitted_at if entry.admitted_at is not None else now
        first = entry.first_token_at
        decode_s = (now - first) if first is not None else 0.0
        return Timings(
            queue_ms=(admitted - arrival) * 1e3,
            prefill_ms=entry.prefill_s * 1e3,
            ttft_ms=(first - arrival) * 1e3 if first is not None else 0.0,
            decode_ms=decode_s * 1e3,
            tokens_per_second=(entry.num_tokens - 1) / decode_s
            if decode_s > 0 and entry.num_tokens > 1
            else 0.0,
        )

    def _emit(self, entry: _Entry, event: Event) -> None:
        self._outbox.append((entry.stream, event))

    def _flush(self) -> None:
        """Hand the buffered events to their event loops, one callback per loop."""
        if not self._outbox:
            return
        by_loop: dict[Any, list[tuple[RequestStream, Event]]] = {}
        for stream, event in self._outbox:
            by_loop.setdefault(stream._loop, []).append((stream, event))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver_all, items)
            except RuntimeError:  # that loop is closed: nobody is listening any more
                pass

    def _read_engine_counters(self) -> _EngineCounters:
        image_in, image_kept = getattr(self.engine, "image_tokens_total", (0, 0))
        return _EngineCounters(getattr(self.engine, "evicted_tokens_total", 0), image_in, image_kept)

    def _refresh_stats(self) -> None:
        counters = self._read_engine_counters()
        old, self._counters = self._counters, counters
        deltas = (
            counters.evicted - old.evicted,
            counters.image_in - old.image_in,
            counters.image_kept - old.image_kept,
        )
        if any(deltas):
            self.observer.on_engine_counters(*deltas)
        try:
            kv_bytes, kv_tokens = self.engine.kv_cache_bytes(), self.engine.kv_cache_tokens()
        except Exception:
            logger.exception("reading KV-cache size failed")
            kv_bytes = kv_tokens = 0
        with self._cond:
            self._num_running = len(self._running)
            self._kv_cache_bytes, self._kv_cache_tokens = kv_bytes, kv_tokens

    def _close_all(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            self._num_queued -= len(waiting)
        for entry in waiting:
            self._retire(entry, ErrorEvent("not_ready", "the server is shutting down"), "error")
        if self._running:
            self._fail_running("not_ready", "the server is shutting down")
        self._refresh_stats()
        self._flush()


def _deliver_all(items: list[tuple[RequestStream, Event]]) -> None:
    for stream, event in items:
        stream._deliver(event)


__all__ = [
    "EngineLike",
    "QueueFullError",
    "RequestFailedError",
    "RequestStatus",
    "RequestStream",
    "Scheduler",
    "SchedulerClosedError",
    "SchedulerConfig",
    "SchedulerObserver",
    "SchedulerStats",
]
