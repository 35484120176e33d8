"""EngineClient: the API process's side of the engine (all that app/ imports of lightvlm_core,
with types.py and errors.py; its stream, stats and observer types live in client_types.py).

`submit` sends a request to the EngineCore and returns its RequestStream once the core has
accepted it (prepare errors raise here, so HTTP can answer 4xx before streaming); a reader thread
turns the core's token ids into events (stream_events.py): incremental detokenisation and stop
strings run in the API process, and metrics are observed from the core's own timestamps. The core
runs in its own process (`EngineClient.start_process`) or in a thread (`EngineClient.start_in_thread`,
for tests and the CLI) behind the same interface. If the core dies, every stream in flight ends with
an error event at once and `on_death` tells the owner, who may start a new client.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from lightvlm_core import errors as errors_module
from lightvlm_core.client_types import (  # re-exported: app/ imports them from here
    EngineClosedError,
    EngineInfo,
    RequestFailedError,
    RequestStream,
    SchedulerClosedError,
    SchedulerObserver,
    SchedulerStats,
)
from lightvlm_core.core import CoreStep, run_engine_process, serve_core
from lightvlm_core.errors import LightVLMError
from lightvlm_core.request import RequestStatus
from lightvlm_core.scheduler import QueueFullError, SchedulerConfig
from lightvlm_core.stream_events import TrackedRequest, request_events
from lightvlm_core.types import ErrorEvent, Event, GenerationRequest

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0  # model download + load + warm-up


class EngineClient:
    """submit / cancel / stats over an EngineCore running in a process or a thread."""

    def __init__(self, config: SchedulerConfig, tokenizer: Any, observer: SchedulerObserver | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.observer = observer or SchedulerObserver()
        self.info: EngineInfo | None = None
        self.on_death: Callable[[], None] | None = None
        self._tracked: dict[str, TrackedRequest] = {}
        self._lock = threading.Lock()  # _tracked, sends, _stats
        self._stats = SchedulerStats()
        self._counters = (0, 0, 0)
        self._alive = False
        self._closing = False
        self._eos: frozenset[int] = frozenset()
        self._conn_in: Any = None  # we send on it
        self._conn_out: Any = None  # we receive on it
        self._process: multiprocessing.process.BaseProcess | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._start_error: str | None = None

    # --- starting ---------------------------------------------------------------------------------

    @classmethod
    def start_process(cls, build_runner: Callable[..., Any], kwargs: dict, config: SchedulerConfig,
                      tokenizer: Any, observer: SchedulerObserver | None = None, warmup: bool = True,
                      env: dict[str, str] | None = None, wait: bool = True) -> EngineClient:
        """Spawn the engine process (`build_runner(**kwargs)` runs there) and wait until it is ready."""
        client = cls(config, tokenizer, observer)
        ctx = multiprocessing.get_context("spawn")
        core_in, client._conn_in = ctx.Pipe(duplex=False)
        client._conn_out, core_out = ctx.Pipe(duplex=False)
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})  # the child inherits the environment at spawn time
        try:
            client._process = ctx.Process(target=run_engine_process, name="lightvlm-engine", daemon=True,
                                          args=(build_runner, kwargs, config, core_in, core_out, warmup))
            client._process.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        core_in.close()  # only the child holds these now: its death closes our ends (EOF)
        core_out.close()
        client._start_reader()
        return client._wait_ready() if wait else client

    @classmethod
    def start_in_thread(cls, runner: Any, config: SchedulerConfig, tokenizer: Any,
                        observer: SchedulerObserver | None = None, warmup: bool = False) -> EngineClient:
        """Run the core in a thread of this process, over the same pipes (tests, the CLI)."""
        client = cls(config, tokenizer, observer)
        core_in, client._conn_in = multiprocessing.Pipe(duplex=False)
        client._conn_out, core_out = multiprocessing.Pipe(duplex=False)

        def run() -> None:
            try:
                serve_core(lambda: runner, {}, config, core_in, core_out, warmup)
            finally:
                core_out.close()
                core_in.close()

        client._thread = threading.Thread(target=run, name="lightvlm-engine-core", daemon=True)
        client._thread.start()
        client._start_reader()
        return client._wait_ready()

    @classmethod
    def launch(cls, model: str | None, config: SchedulerConfig, observer: SchedulerObserver | None = None, *,
               device: str = "auto", dtype: str = "auto", preset: str = "none", trust_remote_code: bool = False,
               warmup: bool = True, own_process: bool = True, env: dict[str, str] | None = None,
               builder: str = "", compile: bool = False) -> EngineClient:
        """Load `model` (None: the bundled demo model) in an engine process (or a thread) and connect.
        The tokenizer loads here while the engine process loads the model. `builder` ("module:function",
        default the model runner) builds the runner from these keyword arguments."""
        builder = builder or RUNNER_BUILDER
        kwargs = dict(model=model, device=device, dtype=dtype, preset=preset, trust_remote_code=trust_remote_code)
        if compile:  # only then: other runner builders (tests' fakes) need not know the option
            kwargs["compile"] = True
        if not own_process:
            runner = _import(builder)(**kwargs)
            return cls.start_in_thread(runner, config, runner.tokenizer, observer, warmup)
        if env is None:
            from lightvlm_core.runtime_env import runtime_env

            env = runtime_env()
        client = cls.start_process(builder, kwargs, config, None, observer, warmup, env, wait=False)
        try:
            client.tokenizer = load_tokenizer(model, trust_remote_code)
        except BaseException:
            client.shutdown()
            raise
        return client._wait_ready()

    def _wait_ready(self) -> EngineClient:
        if not self._ready.wait(START_TIMEOUT_S) or self._start_error is not None:
            self.shutdown()
            raise errors_module.ModelLoadError(f"the engine failed to start: {self._start_error or 'time-out'}")
        return self

    @property
    def pid(self) -> int | None:
        """The engine process's pid (None in thread mode)."""
        return self._process.pid if self._process is not None else None

    @property
    def is_running(self) -> bool:
        return self._alive and not self._closing

    # --- the API ----------------------------------------------------------------------------------

    async def submit(self, request: GenerationRequest) -> RequestStream:
        """Hand a request to the engine; returns its stream once accepted. Raises QueueFullError,
        EngineClosedError, or the InvalidRequestError subclass the engine's prepare raised."""
        stream = RequestStream(self, request.request_id)
        tracked = TrackedRequest(request, stream, self.tokenizer)
        with self._lock:
            if not self.is_running:
                raise EngineClosedError("the engine is not running")
            if request.request_id in self._tracked:
                raise errors_module.InvalidRequestError(f"request_id {request.request_id!r} is already in flight")
            if len(self._tracked) >= self.config.max_in_flight:
                raise QueueFullError(f"too many requests in flight ({len(self._tracked)}); retry later")
            self._tracked[request.request_id] = tracked
            try:
                self._conn_in.send(("add", request))
            except (OSError, ValueError) as exc:
                del self._tracked[request.request_id]
                raise EngineClosedError("the engine is not running") from exc
        try:
            stream.num_prompt_tokens = await asyncio.shield(tracked.accepted)
        except asyncio.CancelledError:
            self.cancel(request.request_id)
            raise
        return stream

    def cancel(self, request_id: str) -> None:
        """Drop a waiting or running request (no-op if unknown or finished)."""
        self._abort(request_id, RequestStatus.FINISHED_CANCELLED)

    def stats(self) -> SchedulerStats:
        """Running / waiting from this side's live view (a request is running from its first token
        on); KV sizes from the core's latest report."""
        with self._lock:
            running = sum(1 for t in self._tracked.values() if t.num_tokens)
            return SchedulerStats(running, len(self._tracked) - running, self._stats.kv_cache_bytes,
                                  self._stats.kv_cache_tokens)

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine: requests in flight end with an error event (first: their clients need
        not wait for the engine process to exit)."""
        self._closing = True
        self._fail_all("not_ready", "the server is shutting down")
        with self._lock:
            try:
                if self._conn_in is not None:
                    self._conn_in.send(("shutdown",))
            except (OSError, ValueError):
                pass
        if self._process is not None:
            self._process.join(timeout_s)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout_s)
        if self._thread is not None:
            self._thread.join(timeout_s)
        self._fail_all("not_ready", "the server is shutting down")

    # --- the reader thread ------------------------------------------------------------------------

    def _start_reader(self) -> None:
        threading.Thread(target=self._read, name="lightvlm-client-reader", daemon=True).start()

    def _read(self) -> None:
        try:
            while True:
                message = self._conn_out.recv()
                try:
                    self._dispatch(message)
                except Exception:
                    log.exception("handling an engine message failed")
        except (EOFError, OSError):
            pass
        was_alive, self._alive = self._alive, False
        if not self._ready.is_set():
            self._start_error = self._start_error or "the engine exited during start-up"
            self._ready.set()
        if self._closing:
            self._fail_all("not_ready", "the server is shutting down")
            return
        log.error("the engine stopped unexpectedly; failing %d requests in flight", len(self._tracked))
        if was_alive and self.on_death is not None:  # first, so /ready is 503 before clients hear of it
            try:
                self.on_death()
            except Exception:
                log.exception("on_death failed")
        self._fail_all("engine_failed", "the engine process died; the request was lost (retry it)")

    def _dispatch(self, message: tuple) -> None:
        kind = message[0]
        if kind == "step":
            self._on_step(message[1])
        elif kind == "accepted":
            self._resolve(message[1], num_prompt_tokens=message[2])
        elif kind == "rejected":
            error_cls = getattr(errors_module, message[2], None)
            if not (isinstance(error_cls, type) and issubclass(error_cls, LightVLMError)):
                error_cls = QueueFullError if message[2] == "QueueFullError" else LightVLMError
            self._resolve(message[1], error=error_cls(message[3]))
        elif kind == "ready":
            self.info = EngineInfo.of(message[1])
            self._counters = tuple(message[1].get("counters", (0, 0, 0)))  # the warm-up's are not traffic
            self._eos = frozenset(self.info.eos_token_ids)
            self._alive = True
            self._ready.set()
        elif kind == "failed":
            self._start_error = message[1]
            self._ready.set()

    def _resolve(self, request_id: str, num_prompt_tokens: int = 0, error: BaseException | None = None) -> None:
        with self._lock:
            tracked = self._tracked.get(request_id)
            if tracked is not None and error is not None:
                del self._tracked[request_id]
        if tracked is None or tracked.settled:
            return
        tracked.settled = True
        tracked.num_prompt_tokens = num_prompt_tokens

        def settle() -> None:
            if tracked.accepted.done():
                return
            if error is not None:
                tracked.accepted.set_exception(error)
            else:
                tracked.accepted.set_result(num_prompt_tokens)

        _call_soon(tracked.stream._loop, settle)

    def _on_step(self, step: CoreStep) -> None:
        deliveries: dict[Any, list[tuple[RequestStream, Event]]] = {}
        for out in step.outputs:
            with self._lock:
                tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            for event in request_events(self, tracked, out):
                deliveries.setdefault(tracked.stream._loop, []).append((tracked.stream, event))
        self._update_stats(step)
        if step.batch_size:
            self._observe("on_step", step.batch_size)
        for loop, items in deliveries.items():
            _call_soon(loop, _deliver_all, items)

    # --- helpers ----------------------------------------------------------------------------------

    def _abort(self, request_id: str, status: RequestStatus, num_output_tokens: int | None = None) -> None:
        with self._lock:
            if request_id not in self._tracked or not self._alive:
                return
            try:
                self._conn_in.send(("abort", request_id, status, None, num_output_tokens))
            except (OSError, ValueError):
                pass

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._tracked.pop(request_id, None)

    def _update_stats(self, step: CoreStep) -> None:
        s = step.stats
        with self._lock:
            self._stats = SchedulerStats(s.num_running, s.num_waiting, s.kv_cache_bytes, s.kv_cache_tokens)
            old, self._counters = self._counters, s.counters
        deltas = tuple(new - before for new, before in zip(s.counters, old))
        if any(deltas):
            self._observe("on_engine_counters", *deltas)

    def _fail_all(self, error_type: str, message: str) -> None:
        with self._lock:
            tracked, self._tracked = list(self._tracked.values()), {}
            self._stats = SchedulerStats()
        for t in tracked:
            if not t.settled:
                t.settled = True
                error = EngineClosedError(message)
                _call_soon(t.stream._loop, lambda t=t, e=error: t.accepted.done() or t.accepted.set_exception(e))
                continue
            self._observe("on_finished", "error", time.monotonic() - t.request.arrival_time)
            _call_soon(t.stream._loop, _deliver_all, [(t.stream, ErrorEvent(error_type, message))])

    def _observe(self, hook: str, *args: Any) -> None:
        try:
            getattr(self.observer, hook)(*args)
        except Exception:
            log.exception("engine observer %s failed (ignored)", hook)


RUNNER_BUILDER = "lightvlm_core.runner:load_runner"


def load_tokenizer(model: str | None, trust_remote_code: bool = False) -> Any:
    """The model's tokenizer, for detokenising in the API process."""
    from transformers import AutoTokenizer  # heavy: only when an engine starts

    from lightvlm_core.loading import default_model

    return AutoTokenizer.from_pretrained(model or default_model(), trust_remote_code=trust_remote_code)


def load_runner(model: str | None = None, **kwargs: Any) -> Any:
    """A model runner in this process (for the engine-in-a-thread mode)."""
    return _import(RUNNER_BUILDER)(model=model, **kwargs)


def _import(path: str) -> Callable[..., Any]:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def _deliver_all(items: list[tuple[RequestStream, Event]]) -> None:
    """Runs on the streams' event loop."""
    for stream, event in items:
        stream._queue.put_nowait(event)


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # that loop is closed: nobody is listening any more
        pass


__all__ = [
    "EngineClient",
    "EngineClosedError",
    "EngineInfo",
    "QueueFullError",
    "RequestFailedError",
    "RequestStream",
    "SchedulerClosedError",
    "SchedulerConfig",
    "SchedulerObserver",
    "SchedulerStats",
]
