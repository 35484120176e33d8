"""Which kernel a linear layer runs on in the compiled CPU graphs (compiled_decode.py,
compiled_prefill.py): `F.linear` is rerouted inside them by a TorchFunctionMode.

- RowLinear, for decode steps of a few rows: a multiply and a sum over the input features, which
  inductor generates as one vectorised pass over the weight per row. On CPU the BLAS call for one
  row reads the weights at a fraction of the memory bandwidth a plain streaming loop reaches:
  measured in-process on an AMD EPYC VM (2 threads), forty 4096x1024 float32 weights: 23-24 GB/s
  for `F.linear` (MKL), 72 GB/s for the fused multiply-sum (a bare `sum`: 77). Per row the weight
  is read again, so its lead shrinks with the rows (2.3x at 2, 1.4x at 4, none at 8).
- OneDnnLinear, for prefill (layers and a compiled vision tower) and larger decode steps:
  oneDNN's matmul instead of MKL's, as an op the compiler calls without looking in (inductor's
  own oneDNN linear needs frozen weights). On the same VM MKL ran prefill-shaped float32 GEMMs
  at 194-216 GFLOP/s and oneDNN at 375-478 (MKL takes a slower path on AMD processors); on an
  Intel Xeon earlier the two were within 10%. So it is used where a start-up measurement finds it
  faster (`onednn_faster`).

Neither is bitwise equal to MKL (other summation orders), like the rest of the compiled graphs;
parity with transformers is tested on the eager passes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lightvlm_core.compiling import best_time

log = logging.getLogger(__name__)

_LIBRARY = torch.library.Library("lightvlm", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


_LIBRARY.impl("onednn_linear", _onednn_linear, "CPU")


@torch.library.register_fake("lightvlm::onednn_linear")
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


class _LinearMode(TorchFunctionMode):
    """Routes `F.linear` (nn.Linear's forward, and our fused projections) to `self.linear`, which
    each subclass defines."""

    linear: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.linear:
            return func(*args, **kwargs)
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        return self.linear(args[0], args[1], bias)


class RowLinear(_LinearMode):
    """Each row's output as a multiply-sum over the weight (see the module docstring)."""

    def linear(self, x, weight, bias):
        out = (x.reshape(-1, 1, x.shape[-1]) * weight).sum(-1).reshape(*x.shape[:-1], weight.shape[0])
        return out if bias is None else out + bias


class OneDnnLinear(_LinearMode):
    """oneDNN's matmul through `lightvlm::onednn_linear` (see the module docstring)."""

    def linear(self, x, weight, bias):
        return torch.ops.lightvlm.onednn_linear(x, weight, bias)


@functools.cache
def onednn_faster(rows: int = 256, width: int = 1024, rounds: int = 7) -> bool:
    """Whether oneDNN's float32 matmul beat `F.linear` by 10% on a prefill-shaped product, measured
    once per process (best of `rounds` each, ~0.1 s): the processor decides (see the docstring)."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, weight = torch.randn(rows, width), torch.randn(width, width)
    try:
        blas = best_time(lambda: F.linear(x, weight), rounds)
        onednn = best_time(lambda: _onednn_linear(x, weight, None), rounds)
    except RuntimeError:  # a torch built without oneDNN's linear
        return False
    log.info("float32 linear %dx%dx%d: F.linear %.2f ms, oneDNN %.2f ms", rows, width, width, blas * 1e3,
             onednn * 1e3)
    return onednn < 0.9 * blas
