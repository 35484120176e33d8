"""The decode step's layers compiled with torch.compile (inductor), on CPU and CUDA.

Why: at decode-size batches a small-width model's step is mostly per-op cost (~35 ATen calls per
layer, each a few µs of dispatch, with Python between them), not arithmetic. Inductor turns the
norms, rotary, activations and residual adds of all layers into a few generated C++ kernels and
calls the GEMMs directly, in one call per step. On CUDA the same graph becomes a few Triton
kernels per layer instead of ~35 kernel launches, each with Python dispatch in front of it.

What stays eager: each layer's KV-cache write and attention run inside one custom op
(`lightvlm::decode_attention`) that the compiler does not look into. The cache grows by one entry
per step; a graph whose shapes followed it would be regenerated with symbolic lengths, which was
measured 2.5x slower than the eager step at batch 8. Through the op, the graph's shapes are fixed
but for the batch size and the cache's capacity, which it only passes along.

Not bitwise equal to the eager step (the fused kernels reduce in another order): greedy tokens
equal the eager step's in tests/core/test_compiled.py, and parity with transformers is
tested on the eager step (LIGHTVLM_COMPILE=0). Applies to steps with no sliding-window layer
(those run eagerly); steps of rows whose KV policy reads decode-time attention (heavy hitters)
run it too, the op adding each step's attention probabilities into the cache's scores.

This step is not captured as a CUDA graph: the op slices each layer's span from a host-side plan,
and the cache buffers are reallocated as they grow and as rows join or leave, so a captured graph
would replay stale shapes and addresses (inductor's cudagraph trees skip graphs that mutate such
inputs). graphed_decode.py captures a variant that attends over each buffer's whole capacity.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch._dynamo import mark_dynamic
from torch._dynamo.exc import TorchDynamoException

from lightvlm_core import cpu_attention, decode_step, forward
from lightvlm_core.compiling import failure_summary
from lightvlm_core.cpu_linear import (KernelRowLinear, OneDnnLinear, RowLinear, onednn_faster, row_kernel_beats_matmul,
                                      row_kernel_ready)
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.models.base import LayerSpec, ModelAdapter

log = logging.getLogger(__name__)


# Defined with the low-level library API rather than `torch.library.custom_op`: the latter wraps
# every call in Python layers (autograd, in-place bookkeeping, a dynamo-disable wrapper) that cost
# ~35 us per call, once per layer per step; this op is dispatched in C++ straight to its kernel.
_LIBRARY = torch.library.Library("lightvlm", "DEF")
_LIBRARY.define("decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, "
                "Tensor(c!) lengths, Tensor rows, Tensor masks, Tensor plan, Tensor(d!) scores, Tensor score_rows, "
                "int layer, float scale) -> Tensor")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     lengths: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor, plan: torch.Tensor,
                     scores: torch.Tensor, score_rows: torch.Tensor, layer: int, scale: float) -> torch.Tensor:
    """Layer `layer`'s cache append and attention, as `BatchedKVCache.append` + SDPA do eagerly.

    q (B, H, 1, D); k, v (B, H_kv, D) the new entries; keys, values (B, H_kv, S_cap, D) the layer's
    buffers; lengths (L, B); rows (B,); masks (L, B, S); plan (3, L): each layer's span after the
    append, whether its rows differ in length (then the key mask is applied) and whether the cache
    keeps scores (KEPT: the new entries' scores start at 0) and some row accumulates them (SCORING);
    scores (B, H_kv, S_cap) float32, the layer's heavy-hitter scores (a spare, not touched, where
    the cache keeps none), score_rows (B,) bool: where SCORING, those rows add this step's attention
    probabilities into `scores`, as `BatchedKVCache.append` + `decode_step.decode` do eagerly.

    With one query per row, the query heads that share a KV head attend as that head's queries
    (B, H_kv, H / H_kv, D): the same arithmetic as grouped-query SDPA without expanding the keys
    and values to every query head first (half the time at 900 entries).
    """
    span, ragged, scores_kept = plan[:, layer].tolist()
    pos = lengths[layer]
    keys[rows, :, pos] = k
    values[rows, :, pos] = v
    if scores_kept:
        scores[rows, :, pos] = 0.0  # a new entry starts from no attention received
    pos.add_(1)
    batch, heads, _, dim = q.shape
    if scores_kept == SCORING:
        return decode_step.attend_and_score(q, keys[:, :, :span], values[:, :, :span], masks[layer, :, :span],
                                            scale, heads // keys.shape[1], scores, score_rows)
    grouped = q.reshape(batch, keys.shape[1], heads // keys.shape[1], dim)
    mask = masks[layer, :, None, None, :span] if ragged else None
    out = F.scaled_dot_product_attention(grouped, keys[:, :, :span], values[:, :, :span], attn_mask=mask,
                                         scale=scale)
    return out.reshape(batch, heads, 1, dim)


_LIBRARY.impl("decode_attention", decode_attention, "CPU")
_LIBRARY.impl("decode_attention", decode_attention, "CUDA")  # `plan` stays on the host: no device sync


@torch.library.register_fake("lightvlm::decode_attention")
def _(q, k, v, keys, values, lengths, rows, masks, plan, scores, score_rows, layer, scale):
    return q.new_empty(q.shape)  # contiguous, as the kernel's output


NOT_KEPT, KEPT, SCORING = 0, 1, 2  # plan[2]: the cache keeps no scores / keeps them / and this step scores
NO_MASKS = torch.empty(0, 0, 0, dtype=torch.bool)  # the key masks passed to the C++ kernel, which reads none


def _layers(attention: str, adapter: ModelAdapter, keys: list[torch.Tensor], values: list[torch.Tensor],
            lengths: torch.Tensor, rows: torch.Tensor, masks: torch.Tensor, plan: torch.Tensor,
            scores: list[torch.Tensor], score_rows: torch.Tensor, h: torch.Tensor,
            ropes: dict[str | None, forward.RopeTables]) -> torch.Tensor:
    """What gets compiled: `decode_step.decode_layers` with the op named `attention` as its attention:
    the custom op above or its C++ kernel (cpu_attention.py), which take the same arguments (a name,
    not the op: what is compiled ahead of time must pickle)."""
    op = getattr(torch.ops.lightvlm, attention)

    def attend(i: int, spec: LayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return op(q, k[:, :, 0], v[:, :, 0], keys[i], values[i], lengths, rows, masks, plan, scores[i], score_rows,
                  i, adapter.scaling)

    return decode_step.decode_layers(adapter, h, ropes, attend)


# On CPU, steps of up to this many rows run their linears row by row (cpu_linear.py): with inductor's
# multiply-sums up to FEW_ROWS (they read the weight again per row), with our C++ kernel up to
# KERNEL_ROWS where it beat the matmul at that many rows on the model's own weights at start-up
# (2.2x oneDNN at 8 rows on 32 layers of `cpu-small` weights, 0.8x on 2048-wide layers), else FEW_ROWS
FEW_ROWS = 4
KERNEL_ROWS = 8


def _few_rows_layers(*args) -> torch.Tensor:
    """What gets compiled for steps of a few rows on CPU: `_layers` with row linears."""
    with RowLinear():
        return _layers(*args)


def _kernel_rows_layers(*args) -> torch.Tensor:
    """The same with our C++ row linear (float32, where it is built and measured faster)."""
    with KernelRowLinear():
        return _layers(*args)


def _onednn_layers(*args) -> torch.Tensor:
    """What gets compiled for larger steps on a CPU where oneDNN's matmul was measured faster."""
    with OneDnnLinear():
        return _layers(*args)


class CompiledDecode:
    """`decode_step.CompiledLayers` with inductor. Compiles one program per kind of step on its first
    call: batch 1; 2 to `few_rows` rows (on CPU, both with row linears: FEW_ROWS or, with our
    kernel, KERNEL_ROWS); more rows (on CPU with oneDNN's matmul where it was measured faster,
    cpu_linear.py). An engine warms up with each (warmup.WARM_UP_BATCHES). The runner prepares the
    model first (`compiling.prepare_to_compile`).

    The programs are compiled ahead of their calls (`aot_compile`) and then called directly, not
    through dynamo's frame hook: that hook checks every guard of the program before each call,
    ~3,500 on a 32-layer model (the model's modules and parameters, the cache's tensors), measured
    at ~1 ms of a 6-8 ms `cpu-small` step. What those guards protect is held here instead: the
    program is chosen by batch size and device, the model, its dtype and the cache's layout are
    fixed for the engine's life, and the sizes that change from step to step are compiled as
    symbols (`_mark_sizes`; a size that would be specialised fails the compile instead)."""

    def __init__(self, adapter: ModelAdapter) -> None:
        cpu = adapter.model.device.type == "cpu"
        kernel = (cpu and adapter.model.dtype == torch.float32 and adapter.head_dim in cpu_attention.HEAD_DIMS
                  and cpu_attention.decode_kernel_ready())
        self.attention = "cpu_decode_attention" if kernel else "decode_attention"
        row_kernel = cpu and adapter.model.dtype == torch.float32 and row_kernel_ready()
        few = (_kernel_rows_layers if row_kernel else _few_rows_layers) if cpu else _layers
        self.few_rows = (_kernel_rows(adapter) if row_kernel else FEW_ROWS) if cpu else 1
        many = _onednn_layers if cpu and onednn_faster() else _layers
        self._bodies = {kind: functools.partial(body, self.attention)
                        for kind, body in (("one", few), ("few", few), ("many", many))}
        self._programs: dict[str, Callable[..., torch.Tensor]] = {}
        self._spare: list[torch.Tensor] = []  # score buffers for steps whose cache keeps none
        self._unscored = torch.zeros(0, dtype=torch.bool)  # their scoring rows: none
        self._sliding = any(spec.attention == "sliding" for spec in adapter.layer_specs)
        self.failed = False  # compilation failed once (e.g. no C++ compiler): eager from then on

    def applies(self, adapter: ModelAdapter, cache: BatchedKVCache) -> bool:
        return not (self.failed or self._sliding)

    def kind(self, batch: int) -> str:
        """Which program a step of `batch` rows runs."""
        if batch == 1:
            return "one"
        return "few" if batch <= self.few_rows else "many"

    def __call__(self, adapter: ModelAdapter, cache: BatchedKVCache, h: torch.Tensor,
                 ropes: dict[str | None, forward.RopeTables]) -> torch.Tensor | None:
        rows, masks, plan = op_layout(cache)
        scores, score_rows = self.step_scores(cache)
        args = (adapter, cache.keys, cache.values, cache.lengths, rows, masks, plan, scores, score_rows, h, ropes)
        kind = self.kind(h.shape[0])
        program = self._programs.get(kind) or self._compile(kind, args)
        return program(*args) if program is not None else None

    def step_scores(self, cache: BatchedKVCache) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The step's score buffers and scoring rows. Without scores, spare buffers of the same
        shapes (each program takes one layout of inputs: it runs without guards), kept while the
        capacities hold; the plan tells the op not to read them."""
        if cache.scores is not None:
            return cache.scores, cache.decode_scored_rows()
        if [s.shape for s in self._spare] != [k.shape[:3] for k in cache.keys]:
            self._spare = [k.new_empty(k.shape[:3], dtype=torch.float32) for k in cache.keys]
        if self._unscored.shape[0] != cache.batch_size:  # no row scores (read only, kept while B holds)
            self._unscored = cache.decode_scored_rows()
        return self._spare, self._unscored

    def _compile(self, kind: str, args: tuple) -> Callable[..., torch.Tensor] | None:
        adapter, keys, values, lengths, rows, masks, plan, scores, score_rows, h, ropes = args
        _mark_sizes(h.shape[0], keys + values, scores, masks, lengths, rows, score_rows, h, ropes)
        try:
            program = compile_program(self._bodies[kind], args)
        except (TorchDynamoException, RuntimeError) as exc:  # e.g. no C++ compiler, inductor caches off
            log.warning("the decode step could not be compiled; it runs eagerly from now on: %s",
                        failure_summary(exc))
            self.failed = True
            return None
        self._programs[kind] = program
        return program


def _kernel_rows(adapter: ModelAdapter) -> int:
    """KERNEL_ROWS where our row kernel beat the matmul at that many rows on the model's decoder
    linears, else FEW_ROWS."""
    weights = [module.weight for module in adapter.text_model.modules() if isinstance(module, torch.nn.Linear)]
    return KERNEL_ROWS if row_kernel_beats_matmul(weights, KERNEL_ROWS) else FEW_ROWS


def compile_program(body: Callable[..., torch.Tensor], args: tuple) -> Callable[..., torch.Tensor]:
    """`body` compiled for calls like `body(*args)`, called from then on without guard checks.
    Without inductor's size asserts either: ~500 Python calls a step on a 32-layer model checking
    each op's output strides (`cpu-small`, one process, both kinds alternating: batch 1 3.51 vs
    3.59 ms, batch 8 8.31 vs 8.60; the compiled-vs-eager token tests still check the programs)."""
    program = torch.compile(body, fullgraph=True, options={"size_asserts": False}).aot_compile((args, {}))
    program.disable_guard_check()
    return program


def op_layout(cache: BatchedKVCache, masks: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What `decode_attention` takes of this step's layout (after `cache.reserve(1)`): the row index,
    every layer's key mask (`masks=False`: an empty tensor, for the C++ kernel, which reads none), and
    the plan (3, L) of each layer's span, raggedness and scores (kept, and scoring where some row
    accumulates them, as in `decode_step.decode`)."""
    rows, spans, ragged = cache.step_layout()
    if cache.scores is None:
        kept = NOT_KEPT
    else:
        kept = SCORING if cache.scoring_step() else KEPT
    key_masks = cache.step_masks() if masks else NO_MASKS
    return rows, key_masks, torch.tensor([spans, ragged, [kept] * len(spans)], dtype=torch.long)


def _mark_sizes(batch: int, buffers: list[torch.Tensor], scores: list[torch.Tensor], masks: torch.Tensor,
                lengths: torch.Tensor, rows: torch.Tensor, score_rows: torch.Tensor, h: torch.Tensor,
                ropes: dict[str | None, forward.RopeTables]) -> None:
    """Sizes that change from step to step are compiled as symbols, not constants: the cache's
    capacity and span (every step) and, beyond one row, the batch size (batch 1 gets a program of
    its own). Marked strictly: the programs run without guards, so a size the compiler would
    specialise must fail the compile rather than be assumed by later steps."""
    for buffer in (*buffers, *scores):
        mark_dynamic(buffer, 2)
    mark_dynamic(masks, 2)
    if batch > 1:
        for tensor in (*buffers, *scores, masks, h, rows, score_rows,
                       *(t for r in ropes.values() for t in (r.cos, r.signed_sin))):
            mark_dynamic(tensor, 1 if tensor is masks else 0)
        mark_dynamic(lengths, 1)
