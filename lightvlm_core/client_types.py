"""The public types of the engine client: what the API process holds on to besides EngineClient
(a request's event stream, the scheduler's stats, the metric hooks, the engine's self-description)
and the errors a submit or a stream can raise. Re-exported by lightvlm_core.client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lightvlm_core.errors import LightVLMError
from lightvlm_core.types import AccelerationConfig, ErrorEvent, Event, GenerationResult, TokenEvent

if TYPE_CHECKING:
    from lightvlm_core.client import EngineClient


class EngineClosedError(LightVLMError):
    """The engine is not running (not started yet, restarting, or shutting down)."""

    error_type = "not_ready"


SchedulerClosedError = EngineClosedError  # the name app/ used before the engine had its own process


class RequestFailedError(LightVLMError):
    """A request ended with an error event (time-out, engine failure, ...)."""

    def __init__(self, event: ErrorEvent) -> None:
        super().__init__(event.message)
        self.error_type = event.error_type


@dataclass(frozen=True)
class SchedulerStats:
    num_running: int = 0
    num_waiting: int = 0  # queued for admission, including requests still being prepared
    kv_cache_bytes: int = 0
    kv_cache_tokens: int = 0


class SchedulerObserver:
    """Metric hooks, called on the client's reader thread with the core's timestamps. Override
    what you need; an exception raised by a hook is logged and ignored."""

    def on_admitted(self, queue_s: float, prefill_s: float, num_prompt_tokens: int) -> None:
        """A request got its first token after `queue_s` waiting and a `prefill_s` prefill."""

    def on_token(self, ttft_s: float | None, itl_s: float | None) -> None:
        """A token was streamed: `ttft_s` for a request's first token, else `itl_s` since its last."""

    def on_finished(self, finish_reason: str, e2e_s: float) -> None:
        """A request ended (`finish_reason`: stop, length, cancelled or error)."""

    def on_step(self, batch_size: int) -> None:
        """One engine step ran over `batch_size` requests."""

    def on_engine_counters(self, evicted_tokens: int, image_tokens_in: int, image_tokens_kept: int) -> None:
        """Increments of the engine's cumulative counters since the last call."""


@dataclass(frozen=True)
class EngineInfo:
    """What the engine reports about itself once started."""

    model_name: str
    family: str
    device: str
    dtype: str
    default_acceleration: AccelerationConfig
    max_context: int | None
    eos_token_ids: tuple[int, ...] = ()
    pid: int | None = None

    @classmethod
    def of(cls, info: dict) -> EngineInfo:
        return cls(str(info["model_name"]), str(info.get("family", "unknown")), str(info.get("device", "cpu")),
                   str(info.get("dtype", "unknown")), info.get("default_acceleration") or AccelerationConfig(),
                   info.get("max_context"), tuple(info.get("eos_token_ids", ())), info.get("pid"))


class RequestStream:
    """The events of one submitted request, as an async iterator. Ends after done or error."""

    def __init__(self, client: EngineClient, request_id: str, num_prompt_tokens: int = 0) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self._client = client
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.finished = False

    def cancel(self) -> None:
        """Ask the engine to drop this request (no-op once finished)."""
        if not self.finished:
            self._client.cancel(self.request_id)

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
                return GenerationResult("".join(texts), token_ids, event.finish_reason, event.usage, event.timings)
        raise RequestFailedError(ErrorEvent("internal_error", "stream ended without a done event"))
