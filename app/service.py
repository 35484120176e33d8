"""The service's runtime state: start the engine (its own process), restart it if it dies, report readiness."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from app.errors import not_ready
from app.metrics import ServiceMetrics
from app.settings import Settings
from lightvlm_core.client import EngineClient, EngineInfo
from lightvlm_core.types import AccelerationConfig

logger = logging.getLogger(__name__)

State = Literal["starting", "loading", "warming_up", "ready", "restarting", "draining", "failed", "stopped"]
T = TypeVar("T")
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)  # between failed engine restarts


class Service:
    """Owns the EngineClient (and through it the engine process) for one app instance.

    With `engine` given as an object (tests: a runner, or an offline `lightvlm_core.engine.Engine`),
    the core runs in a thread of this process; otherwise the model is loaded in an engine process
    (by the runner builder `engine` names as "module:function", default the model runner), which is
    started again whenever it dies (`lightvlm_engine_restarts_total`)."""

    def __init__(self, settings: Settings, engine: Any | None = None) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics(settings.served_model_name or settings.model or "default")
        self.state: State = "starting"
        self.error: str | None = None
        self.created = int(time.time())
        self.scheduler: EngineClient | None = None  # the name routes use; it is the engine client
        self.info: EngineInfo | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self._builder = engine if isinstance(engine, str) else ""
        self._engine = None if isinstance(engine, str) else getattr(engine, "runner", engine)
        self._cut_off_timer: threading.Timer | None = None

    @property
    def client(self) -> EngineClient | None:
        return self.scheduler

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, not shutting down, and the engine alive."""
        return self.state == "ready" and self.scheduler is not None and self.scheduler.is_running

    def begin_drain(self, grace_s: float | None = None) -> None:
        """Shutdown has begun: refuse new requests (503) while in-flight ones finish. With
        `grace_s`, requests still running just before the grace period ends are ended with an
        error event, so that their clients get a complete answer rather than a cut connection."""
        if self.state not in ("starting", "loading", "warming_up", "ready"):
            return
        logger.info("draining: new requests are refused, in-flight requests may finish")
        self.state = "draining"
        if grace_s is not None:
            cut_off_s = max(0.0, grace_s - min(1.0, grace_s / 5))  # leaves time to send the events
            self._cut_off_timer = threading.Timer(cut_off_s, self._cut_off)
            self._cut_off_timer.daemon = True
            self._cut_off_timer.start()

    def _cut_off(self) -> None:
        scheduler = self.scheduler
        if scheduler is not None and scheduler.is_running:
            stats = scheduler.stats()
            logger.warning(
                "shutdown grace period over: ending %d running and %d waiting requests",
                stats.num_running,
                stats.num_waiting,
            )
            scheduler.shutdown()

    @property
    def model_name(self) -> str:
        return self.metrics.model

    def model_names(self) -> set[str]:
        names = {self.model_name}
        if self.info is not None:
            names.add(self.info.model_name)
        return names

    def require_scheduler(self) -> EngineClient:
        if not self.ready or self.scheduler is None:
            raise not_ready("the server is shutting down" if self.state == "draining" else None)
        return self.scheduler

    require_client = require_scheduler

    def acceleration_for(
        self, preset: str | None, keep_ratio: float | None, kv_budget: int | None
    ) -> AccelerationConfig:
        """A request's override: a named preset starts afresh, else unset fields keep the default."""
        if preset is not None:
            return AccelerationConfig(preset=preset, keep_ratio=keep_ratio, kv_budget=kv_budget)
        default = self.info.default_acceleration if self.info is not None else AccelerationConfig()
        return AccelerationConfig(
            preset=default.preset,
            keep_ratio=keep_ratio if keep_ratio is not None else default.keep_ratio,
            kv_budget=kv_budget if kv_budget is not None else default.kv_budget,
        )

    async def start(self) -> None:
        """Start the engine (loading and warming up the model); never raises."""
        try:
            self._advance("loading" if self._engine is None else "warming_up")
            client = await run_in_daemon_thread(self._start_client)
            if self.state in ("draining", "stopped"):  # shut down while it was loading
                await asyncio.to_thread(client.shutdown)
                return
            info = client.info
            assert info is not None
            self.metrics.bind(self.settings.served_model_name or info.model_name, client.stats)
            self.metrics.set_model_info(info.family, info.default_acceleration.preset, info.device, info.dtype)
            self.scheduler, self.info = client, info
            self._advance("ready")
            logger.info("ready", extra={"model": self.model_name, "family": info.family, "device": info.device,
                                        "engine_pid": info.pid})
        except Exception as exc:
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            logger.exception("model failed to load or warm up")
            if self.on_failure is not None:
                self.on_failure(exc)

    def _advance(self, state: State) -> None:
        if self.state not in ("draining", "stopped"):  # a shutdown that began meanwhile wins
            self.state = state

    async def stop(self) -> None:
        if self._cut_off_timer is not None:
            self._cut_off_timer.cancel()
        client, self.scheduler = self.scheduler, None
        self.state = "stopped"
        if client is not None:
            await asyncio.to_thread(client.shutdown)

    def _start_client(self) -> EngineClient:
        s = self.settings
        config = s.scheduler_config()
        runner = self._engine if self._engine is not None or s.engine_process else self._load_engine()
        if runner is not None:
            client = EngineClient.start_in_thread(runner, config, runner.tokenizer, self.metrics, warmup=s.warmup)
        else:
            started = time.monotonic()
            logger.info("loading model", extra={"model": s.model or "(bundled demo)", "device": s.device,
                                                "dtype": s.dtype, "engine_process": s.engine_process})
            client = EngineClient.launch(s.model, config, self.metrics, device=s.device, dtype=s.dtype,
                                         preset=s.preset, trust_remote_code=s.trust_remote_code, warmup=s.warmup,
                                         compile=s.compile,
                                         own_process=s.engine_process, builder=self._builder)
            logger.info("engine started in %.1fs", time.monotonic() - started)
        client.on_death = self._on_engine_death
        return client

    def _load_engine(self) -> Any:
        """The model runner, loaded in this process (LIGHTVLM_ENGINE_PROCESS=0)."""
        from lightvlm_core.client import load_runner

        s = self.settings
        return load_runner(s.model, device=s.device, dtype=s.dtype, preset=s.preset,
                           trust_remote_code=s.trust_remote_code, compile=s.compile)

    def _on_engine_death(self) -> None:
        """On the client's reader thread: every stream in flight has its error event already."""
        if self.state != "ready":
            return
        self.state = "restarting"
        self.metrics.engine_restarts.labels(self.metrics.model).inc()
        logger.error("the engine process died; starting a new one")
        threading.Thread(target=self._restart, name="lightvlm-engine-restart", daemon=True).start()

    def _restart(self) -> None:
        for attempt, backoff in enumerate((0.0, *RESTART_BACKOFF_S)):
            time.sleep(backoff)
            if self.state != "restarting":
                return
            try:
                client = self._start_client()
            except Exception as exc:
                logger.error("engine restart %d failed: %s", attempt + 1, exc)
                continue
            if self.state != "restarting":  # shut down meanwhile
                client.shutdown()
                return
            self.scheduler, self.info = client, client.info
            self.metrics.bind(self.model_name, client.stats)
            self.state = "ready"
            logger.info("engine restarted", extra={"engine_pid": client.pid})
            return
        self.state, self.error = "failed", "the engine could not be restarted"


async def run_in_daemon_thread(fn: Callable[..., T], *args: Any) -> T:
    """Like asyncio.to_thread, but a daemon thread: a slow model load never blocks process exit."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def resolve(set_result: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            set_result(value)

    def target() -> None:
        try:
            outcome: tuple[Callable[[Any], None], Any] = (future.set_result, fn(*args))
        except BaseException as exc:
            outcome = (future.set_exception, exc)
        try:
            loop.call_soon_threadsafe(resolve, *outcome)
        except RuntimeError:  # the loop closed meanwhile: nobody waits for the result
            pass

    threading.Thread(target=target, name=f"lightvlm-{getattr(fn, '__name__', 'task')}", daemon=True).start()
    return await future
