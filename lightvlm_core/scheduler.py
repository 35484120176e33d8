"""The scheduling policy: which requests prefill and which decode in each step. Pure: no threads,
no model, no clock of its own (callers pass `now`), so every decision is testable with hand-built
runner outputs.

One step = every running request decodes one token, and waiting requests join with their
prefill while rows are free and the step's token budget lasts: a decode costs 1 token, a prefill
the tokens it runs through one LLM layer averaged over the layers (`Request.prefill_cost`: its
prompt length, less the image tokens that token reduction removes). A burst of prefills spreads
over several steps instead of freezing the running streams for one long step. The last prefill
to join may overrun what is left of the budget by up to one more step's budget (the group then
runs over two steps, sliced by layers), so a step's budget is filled as vLLM's token chunks fill
it; the first prefill of a step may be longer still (it cannot starve) and then runs alone.

A prefill group that does not fit the budget is sliced by layers, not by tokens: it runs as many
of its layers per step as the budget pays for (a layer of a prefill costs prefill_cost /
num_layers tokens), between the decode steps of the running rows, and samples its first tokens
after the last layer. Token chunks would split an image span, and the pyramid cut needs the whole span at
the cut layer; layer slices keep every layer's view of the prompt whole, so the result is bitwise
that of an unsliced prefill. While one group of prefills is in progress, no other starts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from lightvlm_core.errors import LightVLMError
from lightvlm_core.request import Request, RequestStatus
from lightvlm_core.types import KeptPatches


class QueueFullError(LightVLMError):
    """The waiting queue is full: the caller should retry later (HTTP 429)."""

    error_type = "queue_full"


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 8
    """Most requests decoded together in one step."""
    max_queue: int = 64
    """Most requests waiting for a free batch row (beyond the free rows); more get QueueFullError."""
    max_num_batched_tokens: int = 2048
    """Per-step token budget: decode rows count 1, a prefill its `Request.prefill_cost`."""
    request_timeout_s: float | None = 300.0
    """Arrival -> done limit per request; None: no limit."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be >= 1")
        if self.max_queue < 0:
            raise ValueError(f"max_queue ({self.max_queue}) must be >= 0")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= 1")
        if self.request_timeout_s is not None and self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s ({self.request_timeout_s}) must be > 0 or None")

    @property
    def max_in_flight(self) -> int:
        return self.max_batch_size + self.max_queue


@dataclass
class SchedulerOutput:
    """What one step executes. The runner drops `finished_ids` from its batch first."""

    prefill: list[Request] = field(default_factory=list)  # prefill (a slice of) their layers this step
    prefill_until: int | None = None  # the layer the prefills reach this step (exclusive); None: the last
    decode: list[Request] = field(default_factory=list)  # already running: one token each
    finished_ids: list[str] = field(default_factory=list)  # left since the previous step
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)  # request_id -> tokens

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        return not (self.prefill or self.decode)


@dataclass
class PrefillReport:
    """What a prefill learned about its request (image tokens kept, KV size, kept patches)."""

    image_tokens_kept: int = 0
    image_kept_fraction_layer_avg: float = 1.0
    kv_cache_bytes: int = 0
    kept_patches: list[KeptPatches] | None = None


@dataclass
class TokenLogprobs:
    """The sampled token's log-probability and the top ones (token id, logprob), most likely first."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RunnerOutput:
    """What the runner returns for one SchedulerOutput: ids only, no stop logic, no events."""

    sampled: dict[str, int] = field(default_factory=dict)  # request_id -> token id
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    failed: dict[str, tuple[str, str]] = field(default_factory=dict)  # request_id -> (type, message)
    prefill: dict[str, PrefillReport] = field(default_factory=dict)
    kv_cache_bytes: dict[str, int] = field(default_factory=dict)  # request_id -> bytes held now


@dataclass
class RequestUpdate:
    """One request's news from a step: new tokens, and whether (and how) it finished."""

    request: Request
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    first_token: bool = False  # its first token is among new_token_ids


class Scheduler:
    """Waiting queue + running batch. Only the scheduler changes a request's status."""

    def __init__(self, config: SchedulerConfig, num_layers: int = 1) -> None:
        self.config = config
        self.num_layers = num_layers  # of the model: what a prefill is sliced by
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._finished_ids: list[str] = []  # to tell the runner at the next step

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._finished_ids)

    def add_request(self, request: Request) -> None:
        if len(self.waiting) + len(self.running) >= self.config.max_in_flight:
            raise QueueFullError(f"too many requests in flight ({self.config.max_in_flight}); retry later")
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def schedule(self, now: float, decode: bool = True, admit: bool = True) -> SchedulerOutput:
        """This step's work. With `decode=False` running rows sit the step out (offline prefill);
        with `admit=False` no waiting request starts (a prefill in progress goes on)."""
        out = SchedulerOutput(finished_ids=self._finished_ids)
        self._finished_ids = []
        prefilling = self.prefilling
        out.decode = [r for r in self.running if r.num_output_tokens] if decode else []
        out.num_scheduled_tokens = {r.request_id: 1 for r in out.decode}
        budget = self.config.max_num_batched_tokens - len(out.decode)
        if not prefilling and admit:
            prefilling = self._admit(out, budget, now)
        if prefilling:
            self._slice_prefill(out, prefilling, budget)
        return out

    @property
    def prefilling(self) -> list[Request]:
        """Running requests whose prefill has not finished yet (no token so far)."""
        return [r for r in self.running if r.num_output_tokens == 0]

    def _admit(self, out: SchedulerOutput, budget: int, now: float) -> list[Request]:
        """Waiting requests that start their prefill this step."""
        admitted: list[Request] = []
        free_rows = self.config.max_batch_size - len(out.decode)
        while self.waiting and free_rows > 0:
            if budget <= 0:
                break  # the step is full (its first prefill joins however long it is: no starving)
            cost = self.waiting[0].prefill_cost
            if admitted and cost > budget + self.config.max_num_batched_tokens:
                break  # it would hold the group's others up for more than one more step
            request = self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            request.scheduled_time = now
            admitted.append(request)
            budget -= cost
            free_rows -= 1
        self.running.extend(admitted)
        return admitted

    def _slice_prefill(self, out: SchedulerOutput, prefilling: list[Request], budget: int) -> None:
        """Schedule as many layers of the prefills as `budget` pays for (at least one)."""
        start = prefilling[0].num_computed_layers
        tokens = sum(r.prefill_cost for r in prefilling)
        end = min(self.num_layers, start + max(1, max(budget, 0) * self.num_layers // max(tokens, 1)))
        out.prefill = list(prefilling)
        out.prefill_until = None if end >= self.num_layers else end
        for request in prefilling:
            request.num_computed_layers = end
            share = request.prefill_cost * (end - start) // self.num_layers
            out.num_scheduled_tokens[request.request_id] = max(share, 1)

    def update_from_output(self, scheduled: SchedulerOutput, output: RunnerOutput, now: float
                           ) -> list[RequestUpdate]:
        """Record sampled tokens, retire requests that stopped or failed; one update per request."""
        updates = []
        for request in scheduled.prefill + scheduled.decode:
            if request.is_finished:  # aborted while the step ran
                continue
            rid = request.request_id
            report = output.prefill.get(rid)
            if report is not None:
                request.image_tokens_kept = report.image_tokens_kept
                request.image_kept_fraction_layer_avg = report.image_kept_fraction_layer_avg
                request.kept_patches = report.kept_patches
                request.kv_cache_bytes = max(request.kv_cache_bytes, report.kv_cache_bytes)
            request.kv_cache_bytes = max(request.kv_cache_bytes, output.kv_cache_bytes.get(rid, 0))
            if rid in output.failed:
                self._finish(request, RequestStatus.FINISHED_ERROR, now, output.failed[rid])
                updates.append(RequestUpdate(request, finished=True))
                continue
            if rid not in output.sampled:
                continue  # not executed this step (cannot happen with the model runner)
            update = RequestUpdate(request, first_token=request.first_token_time is None)
            request.append_token(output.sampled[rid], now)
            update.new_token_ids.append(output.sampled[rid])
            if rid in output.logprobs:
                update.new_logprobs.append(output.logprobs[rid])
            status = request.stop_reason()
            if status is not None:
                self._finish(request, status, now)
                update.finished = True
            updates.append(update)
        return updates

    def finish_request(self, request_id: str, status: RequestStatus, now: float,
                       error: tuple[str, str] | None = None, num_output_tokens: int | None = None
                       ) -> Request | None:
        """End a waiting or running request from outside the step (cancel, time-out, a stop string
        found by the client after `num_output_tokens` tokens). Returns it, or None if unknown."""
        request = self._find(request_id)
        if request is None:
            return None
        if num_output_tokens is not None:
            del request.output_token_ids[num_output_tokens:]
        self._finish(request, status, now, error)
        return request

    def pop_finished_ids(self) -> list[str]:
        """Rows that left the batch since the last schedule(), for a caller that frees them now
        (they are not passed to the next SchedulerOutput then)."""
        ids, self._finished_ids = self._finished_ids, []
        return ids

    def expired(self, now: float) -> list[str]:
        """Requests past their deadline (arrival + request_timeout_s)."""
        limit = self.config.request_timeout_s
        if limit is None:
            return []
        return [r.request_id for r in [*self.waiting, *self.running] if now - r.arrival_time >= limit]

    def _find(self, request_id: str) -> Request | None:
        for request in [*self.running, *self.waiting]:
            if request.request_id == request_id:
                return request
        return None

    def _finish(self, request: Request, status: RequestStatus, now: float,
                error: tuple[str, str] | None = None) -> None:
        if request.status == RequestStatus.WAITING:
            self.waiting.remove(request)
        elif request in self.running:
            self.running.remove(request)
            self._finished_ids.append(request.request_id)
        request.finish(status, now, error)
