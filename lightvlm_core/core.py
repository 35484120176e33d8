"""EngineCore: the loop schedule -> execute -> update, in its own process (or a thread, for tests
and the CLI), talking to the EngineClient over two one-way pipes.

Messages in (client -> core): ("add", GenerationRequest), ("abort", request_id, status, error,
num_output_tokens), ("shutdown",). Messages out (core -> client): ("ready", info) or ("failed",
message) once at start; ("accepted", request_id, num_prompt_tokens) or ("rejected", request_id,
error class name, message) per request; ("step", CoreStep) after every step that produced news.
Requests are prepared (templated, tokenised, images processed) on worker threads, never on the
loop; the loop sends only token ids: text, stop strings and SSE live in the API process. A ready
request holds its prefill for at most GATHER_S while others are still being prepared, so a burst
of arrivals prefills as one batch.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from lightvlm_core.errors import LightVLMError
from lightvlm_core.request import Request, RequestStatus
from lightvlm_core.scheduler import (
    QueueFullError,
    RequestUpdate,
    RunnerOutput,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    TokenLogprobs,
)
from lightvlm_core.types import GenerationRequest, KeptPatches
from lightvlm_core.warmup import warm_up

log = logging.getLogger(__name__)

IDLE_POLL_S = 0.5  # how often an idle loop wakes to check time-outs
GATHER_S = 0.02  # longest a ready prefill waits for requests still being prepared beside it


class Runner(Protocol):
    """What the core needs from a runner (lightvlm_core.runner.ModelRunner; fakes in tests)."""

    def info(self) -> dict: ...
    def prepare(self, request: GenerationRequest) -> Request: ...
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput: ...
    def remove(self, request_ids: list[str]) -> None: ...
    def remove_all(self) -> None: ...
    def counters(self) -> tuple[int, int, int]: ...
    def kv_cache_bytes(self) -> int: ...
    def kv_cache_tokens(self) -> int: ...


@dataclass
class RequestOutput:
    """One request's news from a step, as sent to the client."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None  # stop, length, cancelled, error
    error: tuple[str, str] | None = None  # (error_type, message) with finish_reason "error"
    first_token: tuple[float, float, float] | None = None  # (ttft_s, queue_s, prefill_s) with the first token
    usage: dict | None = None  # with finish_reason
    timings: dict | None = None
    e2e_s: float | None = None
    kept_patches: list[KeptPatches] | None = None


@dataclass
class CoreStats:
    num_running: int = 0
    num_waiting: int = 0  # admitted to the queue or still being prepared
    kv_cache_bytes: int = 0
    kv_cache_tokens: int = 0
    counters: tuple[int, int, int] = (0, 0, 0)  # evicted KV entries, image tokens in, kept (cumulative)


@dataclass
class CoreStep:
    outputs: list[RequestOutput] = field(default_factory=list)
    stats: CoreStats = field(default_factory=CoreStats)
    batch_size: int = 0  # rows that decoded in this step (0: no decode ran)


class EngineCore:
    def __init__(self, runner: Runner, config: SchedulerConfig, send: Callable[[tuple], None],
                 prepare_workers: int = 2) -> None:
        self.runner = runner
        self.scheduler = Scheduler(config, num_layers=int(runner.info().get("num_layers", 1)))
        self.send = send
        self.inbox: queue.Queue[tuple] = queue.Queue()
        self._pool = ThreadPoolExecutor(prepare_workers, thread_name_prefix="lightvlm-prepare")
        self._lock = threading.Lock()  # _preparing: the inbox reader adds, the loop removes
        self._preparing: set[str] = set()
        self._cancelled_while_preparing: set[str] = set()
        self._gather_since: float | None = None  # when waiting requests began to hold for a burst
        self._closed = False

    # --- the loop -------------------------------------------------------------------------------

    def run(self) -> None:
        """Until ("shutdown",) arrives. Every request in flight then ends with an error event."""
        try:
            while not self._closed:
                hold_s = self._gather_s(time.monotonic())
                if not self.scheduler.has_work():
                    self._drain_inbox(IDLE_POLL_S)
                elif hold_s > 0 and not self.scheduler.running:  # nothing to step but the held prefills
                    self._drain_inbox(hold_s)
                else:
                    self._drain_inbox(None)
                if self._closed:
                    break
                self._expire()
                if self.scheduler.has_work():
                    self.step()
        finally:
            self._fail_all("not_ready", "the server is shutting down")
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _gather_s(self, now: float) -> float:
        """How much longer waiting requests hold their prefill for the requests still being prepared
        beside them (a burst of arrivals): prefilled as one batch they cost less each than one by one
        (bundled model, per request: 20.5 ms alone, 16.3 ms four together). At most GATHER_S after
        the first of them was ready; 0: prefills start now."""
        with self._lock:
            preparing = bool(self._preparing)
        if not (preparing and self.scheduler.waiting):
            self._gather_since = None
            return 0.0
        if self._gather_since is None:
            self._gather_since = now
        return max(0.0, self._gather_since + GATHER_S - now)

    def step(self) -> None:
        now = time.monotonic()
        scheduled = self.scheduler.schedule(now, admit=self._gather_s(now) == 0)
        if scheduled.is_empty and not scheduled.finished_ids:
            return
        try:
            output = self.runner.execute(scheduled)
        except Exception as exc:  # a bug outside the runner's own row-level recovery
            log.exception("step failed; failing its %d requests", len(scheduled.prefill) + len(scheduled.decode))
            message = f"engine step failed: {type(exc).__name__}: {exc}"
            output = RunnerOutput(failed={r.request_id: ("internal_error", message)
                                          for r in scheduled.prefill + scheduled.decode})
            self._reset_runner()
        updates = self.scheduler.update_from_output(scheduled, output, time.monotonic())
        self._free_finished()
        self._send_step([self._output(u) for u in updates], len(scheduled.decode) + len(scheduled.prefill))

    # --- messages ---------------------------------------------------------------------------------

    def _drain_inbox(self, wait_s: float | None) -> None:
        """Handle every message in the inbox; with `wait_s`, first wait up to that long for one."""
        try:
            message = self.inbox.get(timeout=wait_s) if wait_s is not None else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(message)
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return

    def receive(self, message: tuple) -> None:
        """From the inbox reader thread: new requests start preparing at once (even while a long
        step runs), everything else waits for the loop."""
        if message[0] == "add":
            request: GenerationRequest = message[1]
            with self._lock:
                self._preparing.add(request.request_id)
            self._pool.submit(self._prepare, request)
        else:
            self.inbox.put(message)

    def _handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self.receive(message)
        elif kind == "prepared":
            self._admit(message[1], message[2])
        elif kind == "abort":
            self._abort(*message[1:])
        elif kind == "shutdown":
            self._closed = True

    def _prepare(self, request: GenerationRequest) -> None:  # on a worker thread
        try:
            result: Request | BaseException = self.runner.prepare(request)
        except Exception as exc:
            if not isinstance(exc, LightVLMError):
                log.error("preparing %s failed: %s: %s", request.request_id, type(exc).__name__, exc)
                exc = LightVLMError(f"could not prepare the request: {type(exc).__name__}: {exc}")
            result = exc
        # Answer the client now (it is waiting to start its HTTP response), join the queue later.
        if isinstance(result, Request):
            self.send(("accepted", request.request_id, result.num_prompt_tokens))
        else:
            self.send(("rejected", request.request_id, type(result).__name__, str(result)))
        self.inbox.put(("prepared", request.request_id, result))

    def _admit(self, request_id: str, result: Request | BaseException) -> None:
        with self._lock:
            self._preparing.discard(request_id)
        if isinstance(result, BaseException):
            self._cancelled_while_preparing.discard(request_id)
            return
        if request_id in self._cancelled_while_preparing:
            self._cancelled_while_preparing.discard(request_id)
            self._send_step([RequestOutput(request_id, [], finish_reason="cancelled")])
            return
        try:
            self.scheduler.add_request(result)
        except QueueFullError as exc:  # the client bounds requests in flight: only a misbehaving one
            self._send_step([RequestOutput(request_id, [], finish_reason="error", error=(exc.error_type, str(exc)))])

    def _abort(self, request_id: str, status: RequestStatus = RequestStatus.FINISHED_CANCELLED,
               error: tuple[str, str] | None = None, num_output_tokens: int | None = None) -> None:
        with self._lock:
            preparing = request_id in self._preparing
        if preparing:
            self._cancelled_while_preparing.add(request_id)
            return
        request = self.scheduler.finish_request(request_id, status, time.monotonic(), error, num_output_tokens)
        if request is not None:
            self._free_finished()
            self._send_step([self._output(RequestUpdate(request, finished=True))])

    def _expire(self) -> None:
        now = time.monotonic()
        for request_id in self.scheduler.expired(now):
            limit = self.scheduler.config.request_timeout_s
            self._abort(request_id, RequestStatus.FINISHED_ERROR, ("timeout", f"request timed out after {limit:g}s"))

    def _fail_all(self, error_type: str, message: str) -> None:
        now = time.monotonic()
        outputs = []
        for request in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_ERROR, now, (error_type, message))
            outputs.append(self._output(RequestUpdate(request, finished=True)))
        with self._lock:
            preparing = list(self._preparing)
        outputs += [RequestOutput(rid, [], finish_reason="error", error=(error_type, message)) for rid in preparing]
        self._reset_runner()
        try:
            self._send_step(outputs)
        except (OSError, ValueError):  # the client is gone
            pass

    def _free_finished(self) -> None:
        finished = self.scheduler.pop_finished_ids()
        if finished:
            try:
                self.runner.remove(finished)
            except Exception:
                log.exception("removing finished rows failed; clearing the batch")
                self._fail_all("internal_error", "the engine's batch had to be cleared")

    def _reset_runner(self) -> None:
        try:
            self.runner.remove_all()
        except Exception:
            log.exception("clearing the runner's batch failed")

    # --- outputs ----------------------------------------------------------------------------------

    def _output(self, update: RequestUpdate) -> RequestOutput:
        request = update.request
        out = RequestOutput(request.request_id, update.new_token_ids, update.new_logprobs or None)
        if update.first_token:
            out.first_token = (request.ttft_s(), request.queue_s(), request.prefill_s())
        if update.finished:
            out.finish_reason = request.finish_reason
            out.error = request.error
            out.usage = request.usage().to_dict()
            out.timings = request.timings().to_dict()
            out.e2e_s = request.finished_time - request.arrival_time
            out.kept_patches = request.kept_patches
        return out

    def _send_step(self, outputs: list[RequestOutput], batch_size: int = 0) -> None:
        self.send(("step", CoreStep(outputs, self.stats(), batch_size)))

    def stats(self) -> CoreStats:
        try:
            kv_bytes, kv_tokens = self.runner.kv_cache_bytes(), self.runner.kv_cache_tokens()
            counters = self.runner.counters()
        except Exception:
            log.exception("reading the runner's stats failed")
            kv_bytes = kv_tokens = 0
            counters = (0, 0, 0)
        with self._lock:
            num_preparing = len(self._preparing)
        return CoreStats(self.scheduler.num_running, self.scheduler.num_waiting + num_preparing,
                         kv_bytes, kv_tokens, counters)


def serve_core(build_runner: Callable[..., Runner] | str, kwargs: dict[str, Any], config: SchedulerConfig,
               inbox_conn: Any, outbox_conn: Any, warmup: bool = True, prepare_workers: int = 2) -> None:
    """The engine's main: build the runner, report ready, run the loop. Used as a process target
    (spawn) and, in-process, as a thread target. Ends when the client says shutdown or goes away."""
    send_lock = threading.Lock()

    def send(message: tuple) -> None:
        with send_lock:
            outbox_conn.send(message)

    try:
        if isinstance(build_runner, str):  # "module:function", imported here (keeps torch out of the caller)
            module, _, name = build_runner.partition(":")
            build_runner = getattr(importlib.import_module(module), name)
        runner = build_runner(**kwargs)
        if warmup:
            warm_up(runner)
    except Exception as exc:
        log.exception("engine failed to start")
        try:
            send(("failed", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass
        return
    core = EngineCore(runner, config, send, prepare_workers)
    send(("ready", dict(runner.info(), pid=os.getpid(), counters=tuple(runner.counters()))))

    def read_inbox() -> None:
        try:
            while True:
                core.receive(inbox_conn.recv())
        except (EOFError, OSError):  # the client is gone: stop
            core.inbox.put(("shutdown",))

    threading.Thread(target=read_inbox, name="lightvlm-core-inbox", daemon=True).start()
    core.run()
    outbox_conn.close()


class _JsonLines(logging.Formatter):
    """The engine process logs as the API process does: one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)), "level": record.levelname.lower(), "logger": record.name,
                 "process": "engine", "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def run_engine_process(*args: Any, **kwargs: Any) -> None:
    """The engine process's entry point (spawned): JSON logs on stderr, then serve_core."""
    handler = logging.StreamHandler()
    handler.setFormatter(_JsonLines())
    logging.basicConfig(level=os.environ.get("LIGHTVLM_LOG_LEVEL", "info").upper(), handlers=[handler], force=True)
    for noisy in ("transformers", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:  # no progress bars: they are not JSON lines
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:  # tqdm's default lock is a multiprocessing semaphore (torch.compile's workers make a tqdm even
        # with bars off); os._exit below skips its clean-up, and the API process's resource tracker then
        # warned of a "leaked semaphore" at every shutdown. One process needs only a thread lock.
        from tqdm import tqdm

        tqdm.set_lock(threading.RLock())
    except ImportError:
        pass
    serve_core(*args, **kwargs)
    # Nothing is left to save: skip the interpreter's teardown (torch's can take seconds on a busy
    # machine, and the API process's shutdown waits for this one to exit).
    logging.shutdown()
    sys.stderr.flush()
    os._exit(0)
