"""A causal prefill attention kernel for the compiled CPU prefill (compiled_prefill.py), used where
it was built and measured faster than torch's own.

Why: a prefill's linears already run at this CPU's float32 peak on oneDNN (cpu_linear.py), and
what is left is attention: on a 2-vCPU AMD EPYC torch's CPU flash attention took 108 of the 231 ms
of the LLM-heavy model's prefill (32 layers, 791 tokens) and a quarter of the bundled model's.
It computes its small GEMMs through MKL, which is slow on AMD processors. The kernel
(kernels/causal_attention.cpp: register-tiled AVX-512 loops, a whole score row per query, grouped
query heads read their KV head in place) measured 1.33-1.5x faster at 266-791 tokens there.

It is C++ built on first use with torch.utils.cpp_extension (g++, ~20 s, cached per user in
torch's extensions folder; the service's image has g++ for inductor anyway), and used only where:
the CPU has AVX-512, the build succeeded, its output matches SDPA on a check case, and a start-up
measurement (~0.1 s) finds it 10% faster; `LIGHTVLM_ATTENTION_KERNEL=0` turns it off. Anything
else keeps SDPA. Only plain causal calls (no
mask, no dropout, float32, head_dim 32/64/128, as many keys as queries) are rerouted, by a
TorchFunctionMode inside the compiled prefill layers; parity with transformers is tested on the
eager pass, the compiled pass's tokens against the eager one (tests/core/test_compiled.py).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lightvlm_core.compiling import attention_kernel_enabled, best_time, failure_summary

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "kernels" / "causal_attention.cpp"
HEAD_DIMS = (32, 64, 128)

_LIBRARY = torch.library.Library("lightvlm", "FRAGMENT")
_LIBRARY.define("causal_attention(Tensor q, Tensor k, Tensor v, float scale) -> Tensor")


@torch.library.register_fake("lightvlm::causal_attention")
def _(q, k, v, scale):
    return q.new_empty(q.shape)


@functools.cache
def causal_kernel_ready() -> bool:
    """Whether the kernel is on (LIGHTVLM_ATTENTION_KERNEL, default on), built, correct and faster
    than SDPA here (once per process)."""
    return attention_kernel_enabled() and causal_kernel_built() and _checked_and_faster()


@functools.cache
def causal_kernel_built() -> bool:
    """Whether `lightvlm::causal_attention` has its CPU kernel: an AVX-512 CPU and a build that worked."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    venv_bin = Path(sys.executable).parent  # pip's ninja, where the venv is not on PATH
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        from torch.utils.cpp_extension import load

        load("lightvlm_causal_attention", [str(SOURCE)], is_python_module=False, verbose=False,
             extra_cflags=["-O3", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma",
                           "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"])
    except Exception as exc:  # no compiler, a failed build: SDPA
        log.warning("the causal attention kernel could not be built; prefill attention stays on SDPA: %s",
                    failure_summary(exc))
        return False
    return True


def _checked_and_faster(tokens: int = 256, rounds: int = 7) -> bool:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, tokens, 64, generator=gen) for heads in (4, 2, 2))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    out = torch.ops.lightvlm.causal_attention(q, k, v, 64 ** -0.5)
    if not torch.allclose(out, reference, atol=1e-4, rtol=1e-4):
        log.warning("the causal attention kernel disagrees with SDPA (max diff %.2e); not used",
                    (out - reference).abs().max().item())
        return False
    sdpa = best_time(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), rounds)
    kernel = best_time(lambda: torch.ops.lightvlm.causal_attention(q, k, v, 64 ** -0.5), rounds)
    log.info("causal attention, %d tokens: SDPA %.2f ms, kernel %.2f ms", tokens, sdpa * 1e3, kernel * 1e3)
    return kernel < 0.9 * sdpa


class CausalAttention(TorchFunctionMode):
    """Routes plain causal `F.scaled_dot_product_attention` calls to `lightvlm::causal_attention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and _plain_causal(*args, **kwargs):
            q, k, v = args[:3]
            scale = kwargs.get("scale")
            return torch.ops.lightvlm.causal_attention(q, k, v, scale if scale is not None else q.shape[-1] ** -0.5)
        return func(*args, **kwargs)


def _plain_causal(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> bool:
    return (is_causal and attn_mask is None and dropout_p == 0.0 and q.dtype == torch.float32
            and q.device.type == "cpu" and q.dim() == 4 and q.shape[-1] in HEAD_DIMS
            and q.shape[-2] == k.shape[-2] and (enable_gqa or q.shape[1] == k.shape[1]))
