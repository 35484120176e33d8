"""CPU attention kernels for the compiled passes, used where they were built and measured faster
than what they replace: a prefill attention (causal for the LLM's layers, bidirectional for vision
towers) for the compiled prefill (compiled_prefill.py), and the decode step's cache append +
attention for the compiled decode step (compiled_decode.py).

Why: a prefill's linears already run at this CPU's float32 peak on oneDNN (cpu_linear.py), and
what is left is attention: on a 2-vCPU AMD EPYC torch's CPU flash attention took 108 of the 231 ms
of the LLM-heavy model's prefill (32 layers, 791 tokens) and a quarter of the bundled model's.
It computes its small GEMMs through MKL, which is slow on AMD processors. The kernel
(kernels/prefill_attention.cpp: register-tiled AVX-512 loops, a whole score row per query, grouped
query heads read their KV head in place, a polynomial exp) measured 2.5-3.6x faster than SDPA there
(README, "Prefill attention kernel").

The decode kernel (kernels/decode_attention.cpp) does in one C++ call what `lightvlm::decode_attention`
does as a Python function issuing ~15 ATen ops per layer per step (index writes, slicing, SDPA with
the query groups folded onto their KV head): 78 µs per call of which SDPA took 32 on the 32-layer
`cpu-small` step, a third of the step. It is used for float32 steps with head_dim 32/64/128 where
it matches the Python op on a check case and a start-up measurement finds it 10% faster.

Both are C++ built on first use (cpu_kernels.py), and each is used only where: the CPU has
AVX-512, the build succeeded, its output matches what it replaces (SDPA, the Python op) on check
cases, and a start-up measurement (~0.1 s) finds it 10% faster; `LIGHTVLM_ATTENTION_KERNEL=0`
turns both off (and cpu_linear.py's row linear). Anything else keeps SDPA. Only plain calls (no mask,
no dropout, float32, head_dim 32/64/128, as many keys as queries; causal, or bidirectional) are
rerouted, by a TorchFunctionMode inside the compiled prefill layers and vision tower; parity with
transformers is tested on the eager pass, the compiled pass's tokens against the eager one
(tests/core/test_compiled.py, tests/core/test_cpu_attention.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from lightvlm_core.compiling import attention_kernel_enabled, best_time
from lightvlm_core.cpu_kernels import kernels_built

log = logging.getLogger(__name__)

HEAD_DIMS = (32, 64, 128)

_LIBRARY = torch.library.Library("lightvlm", "FRAGMENT")
_LIBRARY.define("prefill_attention(Tensor q, Tensor k, Tensor v, float scale, bool causal) -> Tensor")
# the schema of lightvlm::decode_attention (compiled_decode.py), whose CPU work it does in C++
_LIBRARY.define("cpu_decode_attention(Tensor q, Tensor k, Tensor v, Tensor(a!) keys, Tensor(b!) values, "
                "Tensor(c!) lengths, Tensor rows, Tensor masks, Tensor plan, Tensor(d!) scores, Tensor score_rows, "
                "int layer, float scale) -> Tensor")


@torch.library.register_fake("lightvlm::prefill_attention")
def _(q, k, v, scale, causal):
    return q.new_empty(q.shape)


@torch.library.register_fake("lightvlm::cpu_decode_attention")
def _(q, k, v, keys, values, lengths, rows, masks, plan, scores, score_rows, layer, scale):
    return q.new_empty(q.shape)


@functools.cache
def prefill_kernel_ready() -> bool:
    """Whether the prefill kernel is on (LIGHTVLM_ATTENTION_KERNEL, default on), built, correct and
    faster than SDPA here, causal and bidirectional (once per process)."""
    return attention_kernel_enabled() and kernels_built() and _checked_and_faster()


@functools.cache
def decode_kernel_ready() -> bool:
    """Whether the decode step's attention runs on `lightvlm::cpu_decode_attention` (once per process):
    LIGHTVLM_ATTENTION_KERNEL, built, equal to the Python op and faster than it here."""
    return attention_kernel_enabled() and kernels_built() and _decode_checked_and_faster()


def _checked_and_faster(rounds: int = 7) -> bool:
    """Against SDPA on a causal case (4 query heads over 2 KV heads, 256 tokens) and a bidirectional
    one (3 heads, 257 tokens: a small CLIP tower's): the same output, and each 10% faster."""
    gen = torch.Generator().manual_seed(0)
    for causal, heads, tokens in ((True, (4, 2, 2), 256), (False, (3, 3, 3), 257)):
        q, k, v = (torch.randn(1, n, tokens, 64, generator=gen) for n in heads)

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

        def kernel():
            return torch.ops.lightvlm.prefill_attention(q, k, v, 64 ** -0.5, causal)

        out, reference = kernel(), sdpa()
        if not torch.allclose(out, reference, atol=1e-4, rtol=1e-4):
            log.warning("the prefill attention kernel disagrees with SDPA (causal=%s, max diff %.2e); not used",
                        causal, (out - reference).abs().max().item())
            return False
        sdpa_time, kernel_time = best_time(sdpa, rounds), best_time(kernel, rounds)
        log.info("prefill attention, %d tokens, causal=%s: SDPA %.2f ms, kernel %.2f ms", tokens, causal,
                 sdpa_time * 1e3, kernel_time * 1e3)
        if kernel_time >= 0.9 * sdpa_time:
            return False
    return True


def _decode_checked_and_faster(entries: int = 600, rounds: int = 20) -> bool:
    """The C++ op against the Python one on a step of two rows of different lengths: the same
    output, cache writes and lengths, and 10% faster."""
    python, cpp = decode_step_inputs(entries), decode_step_inputs(entries)
    expected = torch.ops.lightvlm.decode_attention(*python)
    out = torch.ops.lightvlm.cpu_decode_attention(*cpp)
    same_cache = all(torch.equal(a, b) for a, b in zip(python[3:6], cpp[3:6]))
    same_cache = same_cache and torch.allclose(python[9], cpp[9], atol=1e-6)
    if not (same_cache and torch.allclose(out, expected, atol=1e-5, rtol=1e-4)):
        log.warning("the decode attention kernel disagrees with the Python op (max diff %.2e); not used",
                    (out - expected).abs().max().item())
        return False

    def timed(op) -> Callable[[], object]:
        args = decode_step_inputs(entries)

        def step() -> None:
            args[5] -= 1  # the lengths: the same step again
            op(*args)
        return step

    python_time = best_time(timed(torch.ops.lightvlm.decode_attention), rounds)
    kernel_time = best_time(timed(torch.ops.lightvlm.cpu_decode_attention), rounds)
    log.info("decode attention, %d entries: Python op %.1f us, kernel %.1f us", entries, python_time * 1e6,
             kernel_time * 1e6)
    return kernel_time < 0.9 * python_time


def decode_step_inputs(entries: int, heads: int = 4, kv_heads: int = 2, dim: int = 64, batch: int = 2,
                       seed: int = 0, scoring: bool = True) -> list:
    """Arguments of `lightvlm::decode_attention` for one layer's step, random contents: `batch` rows
    of `entries`, `entries` - 7, ... cached entries (ragged), in buffers with room to spare; with
    `scoring`, every row but the second adds its probabilities into the scores."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([[max(entries - 7 * row, 1) for row in range(batch)]])
    keys, values = (torch.randn(batch, kv_heads, entries + 16, dim, generator=gen) for _ in range(2))
    span = entries + 1
    masks = torch.arange(span)[None, None, :] < (lengths + 1)[:, :, None]
    plan = torch.tensor([[span], [int(batch > 1)], [2 if scoring else 0]])  # compiled_decode.SCORING / NOT_KEPT
    q = torch.randn(batch, heads, 1, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, dim, generator=gen) for _ in range(2))
    scores = torch.rand(batch, kv_heads, entries + 16, generator=gen)
    score_rows = torch.arange(batch) != 1
    return [q, k, v, keys, values, lengths, torch.arange(batch), masks, plan, scores, score_rows, 0, dim ** -0.5]


class PrefillAttention(TorchFunctionMode):
    """Routes plain `F.scaled_dot_product_attention` calls (causal, or bidirectional with no mask) to
    `lightvlm::prefill_attention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _plain_call(*args, **kwargs)
            if call is not None:
                return torch.ops.lightvlm.prefill_attention(*call)
        return func(*args, **kwargs)


def _plain_call(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
                ) -> tuple | None:
    """The kernel's arguments for a call it takes (no mask, no dropout, float32 on the CPU, a head
    size it has, as many keys as queries); None for any other."""
    if not (attn_mask is None and dropout_p == 0.0 and q.dtype == torch.float32
            and q.device.type == "cpu" and q.dim() == 4 and q.shape[-1] in HEAD_DIMS
            and q.shape[-2] == k.shape[-2] and (enable_gqa or q.shape[1] == k.shape[1])):
        return None
    return q, k, v, scale if scale is not None else q.shape[-1] ** -0.5, bool(is_causal)
