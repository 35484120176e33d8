"""The model runner: executes one SchedulerOutput on the model and returns sampled token ids.

Running rows decode one token each (with KV compression where a budget is set), then new rows are
prefilled (with token reduction) and join the batch; a long prefill may run a slice of its layers
per step and join when its last layer is done. No stop logic and no events here: the
scheduler decides what a token means. A failure is pinned on the rows it belongs to where that
can be known: a failed batched prefill is retried row by row, a failed decode step is rolled back
and each row probed alone on a copy of its cache, and the step reruns without the bad rows.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from dataclasses import dataclass, field

import torch

from lightvlm_core import decode_step, forward
from lightvlm_core.compiled_decode import CompiledDecode
from lightvlm_core.compiled_prefill import CompiledPrefill
from lightvlm_core.compiling import cuda_graphs_enabled, prepare_to_compile
from lightvlm_core.errors import LightVLMError
from lightvlm_core.fused_decode import FusedDecode
from lightvlm_core.graphed_decode import GraphedDecode
from lightvlm_core.inputs import InputProcessor, ModelInputs, eos_token_ids
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.kv.compress import KVCompressor, mark_decode_scoring, needs_prefill_scores
from lightvlm_core.loading import LoadedModel, load_model
from lightvlm_core.prefill_batch import pad_batch
from lightvlm_core.reduction import build_prefill_hook, resolve_acceleration
from lightvlm_core.request import Request
from lightvlm_core.rope_table import RopeTable
from lightvlm_core.sampling import make_generator, sample, token_logprobs
from lightvlm_core.scheduler import PrefillReport, RunnerOutput, SchedulerOutput
from lightvlm_core.types import AccelerationConfig, GenerationRequest

log = logging.getLogger(__name__)


@dataclass
class _Row:
    """A request's row in the batch (same order as the cache's rows)."""

    request: Request
    generator: torch.Generator | None

    @property
    def inputs(self) -> ModelInputs:
        return self.request.prompt

    def next_input(self) -> tuple[int, int]:
        """(token id, position id) fed to this step's decode: the last sampled token."""
        n = self.request.num_output_tokens
        return self.request.output_token_ids[-1], self.inputs.next_position + n - 1


@dataclass
class _PrefillJob:
    """Requests prefilled together, over one step or (layer-sliced) several."""

    requests: list[Request]
    run: forward.PrefillRun  # holds the state, the reduction hook and the layers done
    vision_ms: float
    llm_ms: float = 0.0
    dropped: set[str] = field(default_factory=set)  # cancelled while prefilling: left out at the end


class ModelRunner:
    def __init__(self, loaded: LoadedModel, default_acceleration: AccelerationConfig | None = None,
                 compile: bool = False, fused_decode: bool = True) -> None:
        self.loaded = loaded
        self.adapter = loaded.adapter
        self.processor = loaded.processor
        self.tokenizer = loaded.processor.tokenizer
        self.device = loaded.device
        self.default_acceleration = resolve_acceleration(default_acceleration or AccelerationConfig())
        self.max_context = self.adapter.max_context
        self.eos_token_ids = eos_token_ids(loaded.model, self.tokenizer)
        self.inputs = InputProcessor(self.processor, self.adapter, self.eos_token_ids, self.default_acceleration)
        a = self.adapter
        self.cache = BatchedKVCache.empty(len(a.layers), a.num_kv_heads, a.head_dim, loaded.dtype, self.device)
        self.compressor = KVCompressor()
        self.rope_table = RopeTable(self.adapter) if RopeTable.applies(self.adapter) else None
        # the decode step compiled on CPU and CUDA (there replayed as CUDA graphs), the prefill on CPU
        # (see compiled_decode.py, graphed_decode.py, compiled_prefill.py)
        self.compiled_decode: CompiledDecode | FusedDecode | GraphedDecode | None = None
        self.compiled_prefill: CompiledPrefill | None = None
        if compile and self.device.type in ("cpu", "cuda"):
            prepare_to_compile(self.adapter.model)
            self.compiled_decode = CompiledDecode(self.adapter)
            if self.device.type == "cpu":
                # the prefill first: it packs the weights (packed_weights.py) that the fused step reuses
                self.compiled_prefill = CompiledPrefill(self.adapter)
                if fused_decode:  # where the model is Llama-style (else None: the compiled step alone)
                    self.compiled_decode = FusedDecode.of(self.adapter, self.compiled_decode) or self.compiled_decode
            elif cuda_graphs_enabled():
                self.compiled_decode = GraphedDecode(self.adapter, inner=self.compiled_decode)
        self.rows: list[_Row] = []
        self._jobs: list[_PrefillJob] = []  # prefills that go on in the next step (layer-sliced)
        self.image_tokens_in = 0
        self.image_tokens_kept = 0
        self.last_prefill_ms = {"vision_ms": 0.0, "llm_ms": 0.0}  # split of the latest prefill

    # --- what the engine core reports ---------------------------------------------------------

    def info(self) -> dict:
        return {
            "model_name": self.loaded.name,
            "family": self.adapter.family,
            "device": str(self.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "default_acceleration": self.default_acceleration,
            "max_context": self.max_context,
            "eos_token_ids": sorted(self.eos_token_ids),
            "num_layers": len(self.adapter.layers),  # the scheduler slices long prefills by layers
            "compiled_decode": self.compiled_decode is not None,
            "compiled_prefill": self.compiled_prefill is not None,
            "cuda_graphs": isinstance(self.compiled_decode, GraphedDecode),
            "packed_weight_mb": round(self.compiled_prefill.packed_bytes / 2**20, 1) if self.compiled_prefill else 0.0,
        }

    def counters(self) -> tuple[int, int, int]:
        """(KV entries evicted, image tokens in, image tokens kept) since start."""
        return self.compressor.evicted_total, self.image_tokens_in, self.image_tokens_kept

    def kv_cache_bytes(self) -> int:
        return sum(self.cache.row_bytes()) if self.rows else 0

    def kv_cache_tokens(self) -> int:
        return sum(self.cache.row_tokens()) if self.rows else 0

    # --- the step ---------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> Request:
        return self.inputs.prepare(request)

    # The runner's tensors are made and changed in inference mode only (execute and remove): it skips
    # autograd's per-op bookkeeping (version counters, views' autograd metadata), ~9% of a small
    # model's decode step. Tensors made here must not be changed in place outside it.
    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        out = RunnerOutput()
        if scheduled.finished_ids:
            self.remove(scheduled.finished_ids)
        if scheduled.decode:
            self._decode(scheduled.decode, out)
        if scheduled.prefill:
            self._prefill(scheduled.prefill, scheduled.prefill_until, out)
        if self.rows:
            for row, nbytes in zip(self.rows, self.cache.row_bytes()):
                out.kv_cache_bytes[row.request.request_id] = nbytes
        return out

    @torch.inference_mode()
    def remove(self, request_ids: list[str]) -> None:
        gone = set(request_ids)
        keep = [i for i, r in enumerate(self.rows) if r.request.request_id not in gone]
        if len(keep) != len(self.rows):
            self._keep_rows(keep)
        for job in self._jobs:  # a prefill in progress finishes without them
            job.dropped |= gone & {r.request_id for r in job.requests}
        self._jobs = [job for job in self._jobs if len(job.dropped) < len(job.requests)]

    @torch.inference_mode()
    def remove_all(self) -> None:
        self._keep_rows([])
        self._jobs = []

    # --- decode -----------------------------------------------------------------------------------

    def _decode(self, requests: list[Request], out: RunnerOutput) -> None:
        wanted = {r.request_id for r in requests}
        self.remove([r.request.request_id for r in self.rows if r.request.request_id not in wanted])
        lengths = self.cache.lengths.clone()
        try:
            self._decode_step(out)
            return
        except Exception as exc:
            failure = _failure(exc, "decode step failed")
        # Outside the except block, so the failed step's tensors are gone.
        release_device_memory()
        self.cache.lengths = lengths
        if len(self.rows) == 1:
            out.failed[self.rows[0].request.request_id] = failure
            self._keep_rows([])
            return
        bad = [i for i in range(len(self.rows)) if not self._row_decodes_alone(i)]
        if not bad or len(bad) == len(self.rows):  # not pinned on a row: the whole step failed
            bad = list(range(len(self.rows)))
        log.warning("decode step failed (%s); %d of %d rows fail", failure[1], len(bad), len(self.rows))
        for i in bad:
            out.failed[self.rows[i].request.request_id] = failure
        self._keep_rows([i for i in range(len(self.rows)) if i not in bad])
        if self.rows:
            try:
                self._decode_step(out)
            except Exception as exc:
                retry_failure = _failure(exc, "decode step failed")
                for row in self.rows:
                    out.failed[row.request.request_id] = retry_failure
                self._keep_rows([])

    def _decode_step(self, out: RunnerOutput) -> None:
        inputs = [row.next_input() for row in self.rows]
        last = torch.tensor([t for t, _ in inputs], device=self.device)
        pos = torch.tensor([p for _, p in inputs], device=self.device)
        if self.adapter.uses_mrope:
            pos = pos.expand(3, -1)
        logits = decode_step.decode(self.adapter, self.cache, last, pos, self.compiled_decode, self.rope_table)
        self._sample(self.rows, logits, out)
        accels = [row.request.acceleration for row in self.rows]
        self.compressor.after_step(self.cache, [a.kv_budget for a in accels], [a.kv_policy for a in accels])

    def _row_decodes_alone(self, i: int) -> bool:
        """Probe one row of a failed step on a copy of its cache (the batch is left untouched)."""
        row = self.rows[i]
        cache = self.cache.copy_rows([i])
        token, position = row.next_input()
        pos = torch.tensor([position], device=self.device)
        try:
            decode_step.decode(self.adapter, cache, torch.tensor([token], device=self.device),
                           pos.expand(3, -1) if self.adapter.uses_mrope else pos)
            accel = row.request.acceleration
            KVCompressor().after_step(cache, [accel.kv_budget], [accel.kv_policy])
            return True
        except Exception:
            return False

    # --- prefill ----------------------------------------------------------------------------------

    def _prefill(self, requests: list[Request], until: int | None, out: RunnerOutput) -> None:
        """Advance the prefill of `requests` to layer `until` (None: to the end). Requests not seen
        before start, rows with the same acceleration together; rows whose prefill is done sample
        their first token and join the batch."""
        started = {r.request_id for job in self._jobs for r in job.requests}
        groups: dict[tuple, list[Request]] = {}
        for r in requests:
            if r.request_id not in started:
                groups.setdefault(_accel_key(r.acceleration), []).append(r)
        pending = [(job.requests, job) for job in self._jobs] + [(group, None) for group in groups.values()]
        self._jobs = []
        for group, job in pending:
            self._prefill_or_retry(group, job, until, out)

    def _prefill_or_retry(self, group: list[Request], job: _PrefillJob | None, until: int | None,
                          out: RunnerOutput) -> None:
        """A failed group retries row by row, each row from its first layer up to `until`."""
        try:
            self._prefill_group(group, until, out, job)
            return
        except Exception as exc:
            failure = _failure(exc, "prefill failed")
        release_device_memory()
        live = [r for r in group if job is None or r.request_id not in job.dropped]
        if len(group) == 1:
            log.info("prefill of %s failed: %s", group[0].request_id, failure[1])
            out.failed.update({r.request_id: failure for r in live})
            return
        log.warning("batched prefill of %d requests failed (%s); retrying one by one", len(group), failure[1])
        for request in live:
            self._prefill_or_retry([request], None, until, out)

    def _prefill_group(self, group: list[Request], until: int | None, out: RunnerOutput,
                       job: _PrefillJob | None = None) -> None:
        """Start `group`'s prefill (unless `job` carries it on), run it to layer `until`, and finish
        it if that was the last layer; an unfinished job waits in `_jobs` for the next step."""
        job = job or self._start_job(group)
        start = time.monotonic()
        job.run.advance(until)
        self._sync()
        job.llm_ms += (time.monotonic() - start) * 1e3
        if job.run.done:
            self._finish_job(job, out)
        else:
            self._jobs.append(job)

    def _start_job(self, group: list[Request]) -> _PrefillJob:
        start = time.monotonic()
        a, dtype = self.adapter, self.loaded.dtype
        with self.compiled_prefill.eager_vision() if self.compiled_prefill else contextlib.nullcontext():
            embeds, carry = a.embed_with_carry([r.prompt.prompt for r in group], self.device, dtype)
        self._sync()
        vision_ms = (time.monotonic() - start) * 1e3
        state = pad_batch(group, embeds, a, self.device, carry)
        hook = build_prefill_hook(group[0].acceleration, a, [r.num_image_tokens for r in group])
        budgets, policies = [r.acceleration.kv_budget for r in group], [r.acceleration.kv_policy for r in group]
        run = forward.PrefillRun(a, state, hook, kv_scores=needs_prefill_scores(budgets, policies),
                                 compiled=self.compiled_prefill)
        return _PrefillJob(group, run, vision_ms)

    def _finish_job(self, job: _PrefillJob, out: RunnerOutput) -> None:
        """Sample the first tokens and join the batch (rows cancelled meanwhile are left out)."""
        start = time.monotonic()
        h_last, cache, layer_lengths = job.run.result()
        group = job.requests
        mark_decode_scoring(cache, [r.acceleration.kv_budget for r in group], [r.acceleration.kv_policy for r in group])
        keep = [i for i, r in enumerate(group) if r.request_id not in job.dropped]
        logits = forward.logits_for(self.adapter, h_last)
        rows = [_Row(group[i], make_generator(group[i].sampling, self.device)) for i in keep]
        self._sample(rows, logits[keep], out)
        self._sync()
        job.llm_ms += (time.monotonic() - start) * 1e3
        self.last_prefill_ms = {"vision_ms": job.vision_ms, "llm_ms": job.llm_ms}
        lengths = torch.stack(layer_lengths).tolist()  # (L, B)
        for b in keep:
            request = group[b]
            report = self._prefill_report(request, [layer[b] for layer in lengths], cache.bytes_per_entry())
            hook = job.run.hook
            if request.return_kept_patches and hook is not None and hasattr(hook, "kept_patches"):
                report.kept_patches = hook.kept_patches(b)
            out.prefill[request.request_id] = report
        if len(keep) < len(group):
            cache.select(keep)
        self.cache.extend(cache)  # only now: a failure above leaves the batch as it was
        self.rows.extend(rows)

    def _prefill_report(self, request: Request, layer_lengths: list[int], bytes_per_entry: int) -> PrefillReport:
        n_img = request.num_image_tokens
        n_text = request.num_prompt_tokens - n_img
        kept = [n - n_text for n in layer_lengths]
        self.image_tokens_in += n_img
        self.image_tokens_kept += kept[-1]
        return PrefillReport(
            image_tokens_kept=kept[-1],
            image_kept_fraction_layer_avg=sum(kept) / (len(kept) * n_img) if n_img else 1.0,
            kv_cache_bytes=sum(layer_lengths) * bytes_per_entry,
        )

    # --- helpers ----------------------------------------------------------------------------------

    def _sample(self, rows: list[_Row], logits: torch.Tensor, out: RunnerOutput) -> None:
        params = [row.request.sampling for row in rows]
        tokens = sample(logits, params, [row.generator for row in rows])
        for row, token in zip(rows, tokens):
            out.sampled[row.request.request_id] = token
        if any(p.logprobs for p in params):
            for row, lp in zip(rows, token_logprobs(logits, tokens, params)):
                if lp is not None:
                    out.logprobs[row.request.request_id] = lp

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _keep_rows(self, rows: list[int]) -> None:
        self.cache.select(rows)
        self.rows = [self.rows[i] for i in rows]
        if self.cache.scores is not None and not any(r.request.acceleration.kv_budget for r in self.rows):
            self.cache.scores = self.cache.score_rows = None  # back to the fused attention path


def load_runner(model: str | None = None, device: str = "auto", dtype: str = "auto", preset: str = "none",
                trust_remote_code: bool = False, compile: bool = False, fused_decode: bool = True) -> ModelRunner:
    loaded = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    return ModelRunner(loaded, AccelerationConfig(preset=preset), compile=compile, fused_decode=fused_decode)


def release_device_memory() -> None:
    """After a failed step: free what it left behind (tensors caught in reference cycles with the
    exception's frames) and hand cached GPU blocks back, so the next step starts clean."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _failure(exc: BaseException, what: str) -> tuple[str, str]:
    """(error_type, message) for the requests whose prefill or decode raised `exc`."""
    if isinstance(exc, LightVLMError):
        return exc.error_type, str(exc)
    if type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower():
        return "out_of_memory", f"{what}: out of memory on the device; retry later"
    return "internal_error", f"{what}: {type(exc).__name__}: {exc}"


def _accel_key(a: AccelerationConfig) -> tuple:
    return (a.preset, a.keep_ratio, a.schedule)
