"""The service's runtime state: load the engine, warm it up, run the scheduler, report readiness."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from PIL import Image

from app.errors import not_ready
from app.metrics import ServiceMetrics
from app.settings import Settings
from lightvlm_core.scheduler import EngineLike, Scheduler
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

logger = logging.getLogger(__name__)

State = Literal["starting", "loading", "warming_up", "ready", "draining", "failed", "stopped"]
T = TypeVar("T")


@dataclass(frozen=True)
class EngineInfo:
    """What the HTTP layer may know about the engine (public attributes only)."""

    model_name: str
    family: str
    device: str
    dtype: str
    default_acceleration: AccelerationConfig
    max_context: int | None

    @classmethod
    def of(cls, engine: Any) -> EngineInfo:
        return cls(
            model_name=str(engine.model_name),
            family=str(getattr(engine, "family", "unknown")),
            device=str(getattr(engine, "device", "unknown")),
            dtype=str(getattr(engine, "dtype", "unknown")),
            default_acceleration=getattr(engine, "default_acceleration", None) or AccelerationConfig(),
            max_context=getattr(engine, "max_context", None),
        )


class Service:
    """Owns the scheduler (and through it the engine) for one app instance."""

    def __init__(self, settings: Settings, engine: EngineLike | None = None) -> None:
        self.settings = settings
        self.metrics = ServiceMetrics(settings.served_model_name or settings.model or "default")
        self.state: State = "starting"
        self.error: str | None = None
        self.created = int(time.time())
        self.scheduler: Scheduler | None = None
        self.info: EngineInfo | None = None
        self.on_failure: Callable[[BaseException], None] | None = None
        self._engine = engine
        self._cut_off_timer: threading.Timer | None = None

    @property
    def ready(self) -> bool:
        """Loaded, warmed up, not shutting down, and the engine thread alive."""
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

    def require_scheduler(self) -> Scheduler:
        if not self.ready or self.scheduler is None:
            raise not_ready("the server is shutting down" if self.state == "draining" else None)
        return self.scheduler

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
        """Load (unless an engine was given), warm up, start the scheduler; never raises."""
        try:
            engine = self._engine
            if engine is None:
                self._advance("loading")
                engine = await run_in_daemon_thread(self._load_engine)
            scheduler = Scheduler(engine, self.settings.scheduler_config(), observer=self.metrics)
            if self.settings.warmup:
                self._advance("warming_up")
                started = time.monotonic()
                await run_in_daemon_thread(scheduler.warm_up, warmup_request())
                logger.info("warm-up done in %.2fs", time.monotonic() - started)
            scheduler.start()
            info = EngineInfo.of(engine)
            self.metrics.bind(self.settings.served_model_name or info.model_name, scheduler.stats)
            self.metrics.set_model_info(
                info.family, info.default_acceleration.preset, info.device, info.dtype
            )
            self.scheduler, self.info = scheduler, info
            self._advance("ready")
            logger.info(
                "ready", extra={"model": self.model_name, "family": info.family, "device": info.device}
            )
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
        scheduler, self.scheduler = self.scheduler, None
        self.state = "stopped"
        if scheduler is not None:
            await asyncio.to_thread(scheduler.shutdown)

    def _load_engine(self) -> EngineLike:
        from lightvlm_core.engine import load_engine  # heavy (torch, transformers): only when needed

        s = self.settings
        started = time.monotonic()
        logger.info(
            "loading model",
            extra={"model": s.model or "(bundled demo)", "device": s.device, "dtype": s.dtype},
        )
        engine = load_engine(
            s.model, device=s.device, dtype=s.dtype, preset=s.preset, trust_remote_code=s.trust_remote_code
        )
        logger.info("model loaded in %.1fs", time.monotonic() - started)
        return engine


def warmup_request() -> GenerationRequest:
    image = Image.new("RGB", (64, 64), (127, 127, 127))
    return GenerationRequest(
        prompt="Describe the image.", images=[image], sampling=SamplingParams(max_new_tokens=2)
    )


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
