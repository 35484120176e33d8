"""Which kernel a linear layer runs on in the compiled CPU graphs (compiled_decode.py,
compiled_prefill.py): `F.linear` is rerouted inside them by a TorchFunctionMode.

- KernelRowLinear, for decode steps of 1-8 rows where our C++ kernel is built (cpu_kernels.py):
  `lightvlm::row_linear` (kernels/row_linear.cpp) reads each weight row once for all rows of x,
  the weight rows spread over the threads. Else RowLinear: a multiply and a sum over the input
  features, which inductor generates as one vectorised pass over the weight per row; but it
  inlines the producer of x (an RMSNorm) into that pass, and per row of x the weight is read
  again. On the AMD EPYC VM (2 threads), 32 layers of `cpu-small` weights (109 MB) after an
  RMSNorm: kernel 1.8-2.3 / 2.3-2.6 / 3.4-3.5 ms at 1 / 2 / 4 rows, compiled multiply-sum 2.6 / 4.3
  / 6.8 ms. On CPU the BLAS call for one row reads the weights at a fraction of the memory
  bandwidth a plain streaming loop reaches: forty 4096x1024 float32 weights, 23-24 GB/s for
  `F.linear` (MKL), 72 GB/s for the fused multiply-sum (a bare `sum`: 77).
- OneDnnLinear, for prefill (layers and a compiled vision tower) and larger decode steps:
  oneDNN's matmul instead of MKL's, as an op the compiler calls without looking in (inductor's
  own oneDNN linear needs frozen weights). On the same VM MKL ran prefill-shaped float32 GEMMs
  at 194-216 GFLOP/s and oneDNN at 375-478 (MKL takes a slower path on AMD processors); on an
  Intel Xeon earlier the two were within 10%. So it is used where a start-up measurement finds it
  faster (`onednn_faster`). With the weights packed into oneDNN's layout once at start-up where
  memory allows (packed_weights.py), instead of on every call.

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

from lightvlm_core import packed_weights
from lightvlm_core.compiling import attention_kernel_enabled, best_time
from lightvlm_core.cpu_kernels import kernels_built

log = logging.getLogger(__name__)

_LIBRARY = torch.library.Library("lightvlm", "FRAGMENT")
_LIBRARY.define("onednn_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed_weights.packed(weight), bias, "none", [], "")


_LIBRARY.impl("onednn_linear", _onednn_linear, "CPU")


@torch.library.register_fake("lightvlm::onednn_linear")
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# kernels/row_linear.cpp (built by cpu_kernels.py): the few-row product in C++
_LIBRARY.define("row_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


@torch.library.register_fake("lightvlm::row_linear")
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


class KernelRowLinear(_LinearMode):
    """Each row's output by `lightvlm::row_linear` (kernels/row_linear.cpp; see the module docstring)."""

    def linear(self, x, weight, bias):
        return torch.ops.lightvlm.row_linear(x, weight, bias)


@functools.cache
def row_kernel_ready(rows: int = 4, width: int = 1024, rounds: int = 7) -> bool:
    """Whether `lightvlm::row_linear` is on (LIGHTVLM_ATTENTION_KERNEL: our CPU kernels), built,
    equal to `F.linear` for 1-`rows` rows and 10% faster than it (once per process, ~0.1 s). Four
    rows cover its code paths: more are taken four at a time."""
    if not (attention_kernel_enabled() and kernels_built()):
        return False
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(width, width, generator=gen), torch.randn(width, generator=gen)
    for n in range(1, rows + 1):
        x = torch.randn(n, width, generator=gen)
        if not torch.allclose(torch.ops.lightvlm.row_linear(x, weight, bias), F.linear(x, weight, bias),
                              atol=1e-4, rtol=1e-4):
            log.warning("the row linear kernel disagrees with F.linear at %d rows; not used", n)
            return False
    blas = best_time(lambda: F.linear(x, weight), rounds)
    kernel = best_time(lambda: torch.ops.lightvlm.row_linear(x, weight, None), rounds)
    log.info("float32 linear %dx%dx%d: F.linear %.1f us, row kernel %.1f us", rows, width, width, blas * 1e6,
             kernel * 1e6)
    return kernel < 0.9 * blas


def row_kernel_beats_matmul(weights: list[torch.Tensor], rows: int, budget_bytes: int = 256 * 2**20,
                            rounds: int = 3) -> bool:
    """Whether `lightvlm::row_linear` multiplied `rows` rows of x by `weights` (a model's decode
    linears, as many as fit in `budget_bytes`, so they come from memory as in a step) faster than
    the matmul larger steps use. Beyond 4 rows the kernel reads each block of weight rows again per
    4 rows of x and turns compute-bound: at 8 rows on the AMD EPYC VM it was 2.2x oneDNN on 256-wide
    layers but 0.8x on 2048-wide ones."""
    chosen, total = [], 0
    for weight in weights:
        if total and total + weight.numel() * weight.element_size() > budget_bytes:
            break
        chosen.append(weight)
        total += weight.numel() * weight.element_size()
    inputs = [torch.randn(rows, weight.shape[1]) for weight in chosen]
    matmul = _onednn_linear if onednn_faster() else (lambda x, weight, bias: F.linear(x, weight, bias))

    def run(linear) -> None:
        for x, weight in zip(inputs, chosen):
            linear(x, weight, None)

    kernel = best_time(lambda: run(torch.ops.lightvlm.row_linear), rounds)
    other = best_time(lambda: run(matmul), rounds)
    log.info("decode linears at %d rows (%.0f MB): row kernel %.2f ms, matmul %.2f ms", rows, total / 2**20,
             kernel * 1e3, other * 1e3)
    return kernel < other


class OneDnnLinear(_LinearMode):
    """oneDNN's matmul through `lightvlm::onednn_linear` (see the module docstring)."""

    def linear(self, x, weight, bias):
        return torch.ops.lightvlm.onednn_linear(x, weight, bias)


@functools.cache
def onednn_faster(rows: int = 256, width: int = 1024, rounds: int = 7) -> bool:
    """Whether oneDNN's float32 matmul beat `F.linear` by 10% on a prefill-shaped product, measured
    once per process (best of `rounds` each, ~0.1 s): the processor decides (see the docstring).
    oneDNN as the prefill runs it: by a packed weight unless LIGHTVLM_PACKED_WEIGHTS is false."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, weight = torch.randn(rows, width), torch.randn(width, width)
    try:
        onednn_weight = weight if packed_weights.setting() == "false" else packed_weights.packed_copy(weight)
        blas = best_time(lambda: F.linear(x, weight), rounds)
        onednn = best_time(lambda: torch.ops.mkldnn._linear_pointwise(x, onednn_weight, None, "none", [], ""),
                           rounds)
    except RuntimeError:  # a torch built without oneDNN's linear
        return False
    log.info("float32 linear %dx%dx%d: F.linear %.2f ms, oneDNN %.2f ms (%s weight)", rows, width, width, blas * 1e3,
             onednn * 1e3, "plain" if onednn_weight is weight else "packed")
    return onednn < 0.9 * blas
