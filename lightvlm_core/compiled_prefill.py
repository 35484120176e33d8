"""Prefill compiled with torch.compile (inductor), on CPU: the decoder layers and the vision tower.

Why: a prefill's GEMMs run near this CPU's peak (oneDNN's, cpu_linear.OneDnnLinear, with the
weights packed once: packed_weights.py), but around them each layer spent a
fifth of its time in elementwise passes over (tokens x width) tensors (norms, rotary, SiLU-gate,
residual adds, quick-GELU in CLIP) and in Python between ops; inductor fuses those passes.
Measured in-process (scripts/ab_compiled_prefill.py; 2 cores, fp32): a prefill (vision + LLM +
first token) 1.07-1.26x faster on the 32-layer LLM-heavy model and 1.11-1.18x on the bundled one,
at batch 1 and 4, `none` and `aggressive` (README, "Compiled prefill").

One graph serves every layer (the layer's weights are graph inputs, not constants) and every
prompt length (the token count, and beyond one row the batch, are symbols): an engine's warm-up
(warmup.warm_up: one row, then two) compiles all there is. Token reduction acts between layers, as
in the eager pass; only causal layers run compiled (bidirectional images and sliding windows need
the explicit mask, and run eagerly). The vision tower is compiled only where its input has a fixed
size (`ModelAdapter.fixed_size_vision_tower`): towers fed a variable number of patches per image
(Qwen2-VL's) would compile again for every new image size.

Not bitwise equal to the eager pass (fused reductions): greedy tokens equal the eager pass's in
tests/core/test_compiled.py; parity with transformers is tested eagerly (LIGHTVLM_COMPILE=0).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Sequence

import torch
from torch import nn
from torch._dynamo import maybe_mark_dynamic
from torch._dynamo.exc import TorchDynamoException

from lightvlm_core import forward, packed_weights
from lightvlm_core.compiling import failure_summary
from lightvlm_core.cpu_attention import PrefillAttention, prefill_kernel_ready
from lightvlm_core.cpu_linear import OneDnnLinear, onednn_faster
from lightvlm_core.models.base import ModelAdapter

log = logging.getLogger(__name__)


def _layer(adapter: ModelAdapter, layer: nn.Module, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What gets compiled: `forward.prefill_layer` of a causal layer."""
    return forward.prefill_layer(adapter, layer, h, forward.RopeTables(cos, signed_sin), None)


class CompiledPrefill:
    """`forward.CompiledPrefillLayers` with inductor, plus the vision tower where its input size is fixed."""

    def __init__(self, adapter: ModelAdapter) -> None:
        # linears on oneDNN and attention on our kernel, each where it measured faster
        modes = [mode for mode, use in ((OneDnnLinear, onednn_faster()), (PrefillAttention, prefill_kernel_ready()))
                 if use]
        self._fn = torch.compile(functools.partial(_in_modes, modes, _layer) if modes else _layer, fullgraph=True)
        self.failed = False  # compilation failed once (e.g. no C++ compiler): eager from then on
        name = adapter.fixed_size_vision_tower
        tower = getattr(adapter.model.model, name, None) if name else None
        self.vision = CompiledForward(tower, modes) if tower is not None else None
        # an eager tower (and its projector) computes on oneDNN too: see `eager_vision`
        self._eager_vision_onednn = OneDnnLinear in modes and self.vision is None
        self.packed_bytes = 0  # oneDNN's layout made once, not on every product (packed_weights.py)
        if OneDnnLinear in modes:
            vision = [tower] if self.vision else vision_modules(adapter)
            self.packed_bytes = packed_weights.pack(packed_weights.prefill_weights([*adapter.layers, *vision]))

    def eager_vision(self) -> contextlib.AbstractContextManager:
        """What the runner computes image features in: where the tower runs eagerly (its patch count
        varies per image: Qwen's, Pixtral's, ...), its linears and the projector's on oneDNN with
        the packed weights, as in the compiled graphs, instead of MKL's (2x slower on AMD, above)."""
        return OneDnnLinear() if self._eager_vision_onednn else contextlib.nullcontext()

    def layer(self, adapter: ModelAdapter, layer: nn.Module, h: torch.Tensor, rope: forward.RopeTables
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        if self.failed:
            return None
        _mark_sizes(h, rope)
        try:
            return self._fn(adapter, layer, h, rope.cos, rope.signed_sin)
        except TorchDynamoException as exc:  # raised while compiling, before the graph ran
            log.warning("the prefill layers could not be compiled; they run eagerly from now on: %s",
                        failure_summary(exc))
            self.failed = True
            return None


class CompiledForward:
    """Stands for a module's `forward`: the compiled version, or the eager one for good (after one
    warning) once compiling failed. Graph breaks are allowed: HF towers have a few. `modes`
    (TorchFunctionMode classes: cpu_linear's, cpu_attention's) reroute the module's linears and
    attention in the compiled version."""

    def __init__(self, module: nn.Module, modes: Sequence[type] = ()) -> None:
        self.module, self.eager = module, module.forward
        self.compiled = torch.compile(functools.partial(_in_modes, list(modes), self.eager) if modes else self.eager)
        module.forward = self

    def __call__(self, *args, **kwargs):
        try:
            return self.compiled(*args, **kwargs)
        except TorchDynamoException as exc:  # raised while compiling, before the graph ran
            log.warning("the vision tower could not be compiled; it runs eagerly from now on: %s",
                        failure_summary(exc))
            self.module.forward = self.eager
            return self.eager(*args, **kwargs)


def vision_modules(adapter: ModelAdapter) -> list[nn.Module]:
    """What computes image features: every part of the model beside the text decoder (the vision
    tower, the projector)."""
    return [module for module in adapter.model.model.children() if module is not adapter.text_model]


def _in_modes(modes: list[type], fn, *args, **kwargs):
    """`fn` inside each of `modes` (TorchFunctionMode classes), the first outermost."""
    if not modes:
        return fn(*args, **kwargs)
    with modes[0]():
        return _in_modes(modes[1:], fn, *args, **kwargs)


def _mark_sizes(h: torch.Tensor, rope: forward.RopeTables) -> None:
    """The prompt length is a symbol, and beyond one row the batch size (batch 1 gets a graph of its
    own): otherwise every new length would compile the graph again."""
    maybe_mark_dynamic(h, 1)
    for table in (rope.cos, rope.signed_sin):  # (B, 1, T, D)
        maybe_mark_dynamic(table, 2)
    if h.shape[0] > 1:
        for tensor in (h, rope.cos, rope.signed_sin):
            maybe_mark_dynamic(tensor, 0)
