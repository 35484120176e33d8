"""Continuous (iteration-level) batching over one engine, driven by one engine thread.

The engine is not thread-safe, so exactly one thread (the engine thread) calls `add`, `step`
and `remove`. Every iteration of its loop:

1. drains cancellations and time-outs (rows leave the batch, their KV memory is freed);
2. admits waiting requests into the running batch, up to `max_batch_size`, with one batched
   prefill (`engine.add`); if that fails the requests are retried one by one, so a bad request
   fails alone;
3. decodes one token for every running request (`engine.step`) and retires finished ones; a
   failed step (e.g. out of GPU memory) ends the requests of that step with an error event,
   clears the engine's batch and releases cached device memory, and the loop goes on;
4. hands the events to the asyncio loops that wait for them (`call_soon_threadsafe`).

Callers (the HTTP service, benchmarks) use three things: `await submit(request)` returns a
`RequestStream` (an async iterator of `TokenEvent` ... `DoneEvent | ErrorEvent`), `cancel(id)`,
and `stats()`. `engine.prepare` (tokenisation, image preprocessing) runs in a small thread pool
at submit time, so a bad request raises there, before anything is queued.

This module knows nothing about HTTP or Prometheus: metrics flow out through
`SchedulerObserver` callbacks, invoked on the engine thread. The caller-facing types live in
scheduler_api.py and are re-exported here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lightvlm_core.errors import InvalidRequestError, LightVLMError
from lightvlm_core.scheduler_api import (
    EngineLike,
    QueueFullError,
    RequestFailedError,
    RequestStatus,
    RequestStream,
    SchedulerClosedError,
    SchedulerConfig,
    SchedulerObserver,
    SchedulerStats,
    deliver_all,
)
from lightvlm_core.types import (
    DoneEvent,
    ErrorEvent,
    Event,
    FinishReason,
    GenerationRequest,
    Timings,
    Usage,
)

if TYPE_CHECKING:
    from lightvlm_core.engine import PreparedRequest, StepOutput

logger = logging.getLogger(__name__)

_STATUS_OF_REASON: dict[str, RequestStatus] = {
    "stop": RequestStatus.FINISHED_STOPPED,
    "length": RequestStatus.FINISHED_LENGTH,
    "cancelled": RequestStatus.FINISHED_CANCELLED,
    "error": RequestStatus.FINISHED_ERROR,
}


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
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._cancel_ids or self._running):
                        self._cond.wait(timeout=1.0)
                    if self._closed:
                        break
                    cancel_ids, self._cancel_ids = self._cancel_ids, set()
                failed = False
                try:
                    self._iterate(cancel_ids)
                except Exception:  # a bug here must not kill the thread and hang every client
                    logger.exception("scheduler iteration failed; failing the running requests")
                    failed = True
                if failed:  # outside the except block: the traceback (and its tensors) is gone
                    self._fail_running("internal_error", "internal scheduler error")
                    self._release_device_memory()
                    time.sleep(0.01)
                self._refresh_stats()
                self._flush()
        finally:  # also on BaseException: nobody may wait forever on a dead engine thread
            with self._cond:
                self._closed = True
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
            failure: ErrorEvent | None = None
            try:
                outputs = self.engine.step()
            except Exception as exc:
                logger.exception("decode step failed for %d requests", batch_size)
                failure = failure_event(exc, "decode step failed")
            if failure is not None:
                # A batched step cannot be pinned on one row: every row of it ends, the engine's
                # batch is cleared, and the requests still waiting are admitted next iteration.
                self._fail_running(failure.error_type, failure.message)
                self._release_device_memory()
                return
            self._observe("on_step", batch_size)
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
        failure: ErrorEvent | None = None
        try:
            outputs = self.engine.add([e.prepared for e in entries])
        except Exception as exc:
            if len(entries) > 1:
                logger.warning(
                    "batched prefill of %d requests failed (%s: %s); retrying one by one",
                    len(entries),
                    type(exc).__name__,
                    exc,
                )
            failure = failure_event(exc, "prefill failed")
            if not isinstance(exc, LightVLMError):
                logger.error(
                    "prefill of %s failed: %s: %s",
                    ", ".join(e.request_id for e in entries),
                    type(exc).__name__,
                    exc,
                    extra={"request_id": entries[0].request_id},
                )
        if failure is not None:  # outside the except block, so the failed prefill's memory is free
            self._release_device_memory()
            if len(entries) > 1:
                for entry in entries:
                    self._admit([entry])
            else:
                self._retire(entries[0], failure, "error")
            return
        end = time.monotonic()
        for entry in entries:
            entry.status = RequestStatus.RUNNING
            entry.admitted_at, entry.prefill_s = start, end - start
            self._running[entry.request_id] = entry
            self._observe(
                "on_admitted",
                start - entry.request.arrival_time,
                end - start,
                entry.prepared.num_prompt_tokens,
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
                    self._observe("on_token", now - entry.request.arrival_time, None)
                else:
                    self._observe("on_token", None, now - (entry.last_token_at or now))
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
        self._observe("on_finished", finish_reason, time.monotonic() - entry.request.arrival_time)
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

    def _observe(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:
            logger.exception("scheduler observer %s failed (ignored)", hook)

    def _release_device_memory(self) -> None:
        """After a failed step or prefill: free what it left behind and hand cached GPU blocks
        back to the driver, so the next step starts from a clean allocator."""
        try:
            gc.collect()  # tensors caught in reference cycles with the exception's frames
            release = getattr(self.engine, "release_memory", None)
            if callable(release):
                release()
                return
            torch = sys.modules.get("torch")  # never imported here: only if the engine did
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        except Exception:
            logger.exception("releasing device memory failed")

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
                loop.call_soon_threadsafe(deliver_all, items)
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
            self._observe("on_engine_counters", *deltas)
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


def is_out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA caching allocator) or an allocator's "out of memory" message."""
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def failure_event(exc: BaseException, what: str) -> ErrorEvent:
    """The error event for requests whose prefill or decode step raised `exc`."""
    if isinstance(exc, LightVLMError):
        return ErrorEvent(exc.error_type, str(exc))
    if is_out_of_memory(exc):
        return ErrorEvent("out_of_memory", f"{what}: out of memory on the device; retry later")
    return ErrorEvent("internal_error", f"{what}: {type(exc).__name__}: {exc}")


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
