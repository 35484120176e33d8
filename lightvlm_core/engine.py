"""Offline use of the engine in the caller's thread: the CLI, benchmarks, the eval and tests.

`Engine` drives the same Scheduler and ModelRunner as the EngineCore, synchronously and without
IPC: `add` prefills requests into the running batch, `step` decodes one token for every running
row, `generate` runs requests together to the end. Text (detokenisation, stop strings) is made
here as the EngineClient makes it in the service.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

from lightvlm_core.detok import IncrementalDetokenizer
from lightvlm_core.errors import InvalidRequestError, LightVLMError
from lightvlm_core.loading import LoadedModel
from lightvlm_core.request import Request, RequestStatus
from lightvlm_core.runner import ModelRunner, load_runner
from lightvlm_core.scheduler import RequestUpdate, Scheduler, SchedulerConfig
from lightvlm_core.types import DoneEvent, GenerationRequest, GenerationResult, TokenEvent

UNBOUNDED = SchedulerConfig(max_batch_size=1024, max_queue=1 << 20, max_num_batched_tokens=1 << 30,
                            request_timeout_s=None)


@dataclass
class StepOutput:
    request_id: str
    token: TokenEvent | None = None
    done: DoneEvent | None = None
    error: tuple[str, str] | None = None  # (error_type, message): the request failed and left the batch


class RequestFailed(LightVLMError):
    """An offline request ended with an error (its prefill or decode raised)."""


class Engine:
    def __init__(self, runner: ModelRunner | LoadedModel, config: SchedulerConfig = UNBOUNDED) -> None:
        self.runner = runner if isinstance(runner, ModelRunner) else ModelRunner(runner)
        self.scheduler = Scheduler(config, num_layers=len(self.runner.adapter.layers))
        self._detoks: dict[str, IncrementalDetokenizer] = {}

    # The runner's parts, for benchmarks and tests.
    def __getattr__(self, name: str):
        if name in ("loaded", "adapter", "processor", "tokenizer", "device", "default_acceleration",
                    "max_context", "eos_token_ids", "last_prefill_ms", "cache", "compressor"):
            return getattr(self.runner, name)
        raise AttributeError(name)

    @property
    def model_name(self) -> str:
        return self.runner.loaded.name

    @property
    def running(self) -> list[Request]:
        return self.scheduler.running

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    def kv_cache_bytes(self) -> int:
        return self.runner.kv_cache_bytes()

    def kv_cache_tokens(self) -> int:
        return self.runner.kv_cache_tokens()

    def prepare(self, request: GenerationRequest) -> Request:
        return self.runner.prepare(request)

    def add(self, prepared: list[Request]) -> list[StepOutput]:
        """Prefill `prepared` (running rows sit this step out) and return their first tokens."""
        ids = [request.request_id for request in prepared]
        if len(set(ids)) < len(ids) or any(i in self._detoks for i in ids):  # one request's tokens would go to two
            raise InvalidRequestError("request ids must be unique among running requests: pass one GenerationRequest "
                                      "per request (the same one twice shares its request_id)")
        for request in prepared:
            self.scheduler.add_request(request)
            self._detoks[request.request_id] = IncrementalDetokenizer(self.runner.tokenizer, request.sampling.stop)
        outputs = self._run(self.scheduler.schedule(time.monotonic(), decode=False))
        while self.scheduler.prefilling:  # a prefill sliced by a small token budget goes on
            outputs += self._run(self.scheduler.schedule(time.monotonic(), decode=False))
        return outputs

    def step(self) -> list[StepOutput]:
        """Decode one token for every running row."""
        return self._run(self.scheduler.schedule(time.monotonic()))

    def stream(self, request: GenerationRequest) -> Iterator[StepOutput]:
        """Run one request alone (the batch must be idle), yielding its step outputs."""
        if self.scheduler.running:
            raise RuntimeError("stream() needs an idle engine")
        outputs = self.add([self.prepare(request)])
        while True:
            for out in outputs:
                if out.error:
                    raise RequestFailed(out.error[1])
                yield out
            if any(o.done for o in outputs) or not self.scheduler.running:
                return
            outputs = self.step()

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Run requests together as one batch until all finish."""
        prepared = [self.prepare(r) for r in requests]
        tokens: dict[str, list[TokenEvent]] = {p.request_id: [] for p in prepared}
        results: dict[str, GenerationResult] = {}
        outputs = self.add(prepared)
        while True:
            for out in outputs:
                if out.error:
                    raise RequestFailed(f"request {out.request_id} failed: {out.error[1]}")
                if out.token:
                    tokens[out.request_id].append(out.token)
                if out.done:
                    evs = tokens[out.request_id]
                    results[out.request_id] = GenerationResult(
                        text="".join(e.text for e in evs), token_ids=[e.token_id for e in evs],
                        finish_reason=out.done.finish_reason, usage=out.done.usage, timings=out.done.timings)
            if not self.scheduler.running:
                break
            outputs = self.step()
        return [results[p.request_id] for p in prepared]

    def _run(self, scheduled) -> list[StepOutput]:
        """One step; a failed request's output carries `error` (the others go on)."""
        output = self.runner.execute(scheduled)
        updates = self.scheduler.update_from_output(scheduled, output, time.monotonic())
        outputs = [self._step_output(u) for u in updates]
        self.runner.remove(self.scheduler.pop_finished_ids())
        return outputs

    def _step_output(self, update: RequestUpdate) -> StepOutput:
        request = update.request
        detok = self._detoks[request.request_id]
        out = StepOutput(request.request_id)
        for token_id in update.new_token_ids:
            is_eos = token_id in request.eos_token_ids and not request.sampling.ignore_eos
            text = "" if is_eos else detok.add(token_id)
            out.token = TokenEvent(index=request.num_output_tokens - 1, token_id=token_id, text=text)
        if detok.stopped and not request.is_finished:
            self.scheduler.finish_request(request.request_id, RequestStatus.FINISHED_STOPPED, time.monotonic())
        if request.is_finished:
            if out.token is not None:
                out.token.text += detok.finish()
            if request.finish_reason == "error":
                out.error = request.error
            else:
                out.done = DoneEvent(request.finish_reason, request.usage(), request.timings(),
                                     kept_patches=request.kept_patches)
            del self._detoks[request.request_id]
        return out


def load_engine(model: str | None = None, device: str = "auto", dtype: str = "auto", preset: str = "none",
                trust_remote_code: bool = False) -> Engine:
    return Engine(load_runner(model, device=device, dtype=dtype, preset=preset,
                              trust_remote_code=trust_remote_code))
