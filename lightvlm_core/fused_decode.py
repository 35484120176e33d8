"""The decode step's decoder layers in one C++ call (`lightvlm::decode_layers`,
kernels/decode_layers.cpp), on CPU, for Llama-style models in float32.

Why: at decode-size batches a step is memory- and call-bound, not arithmetic-bound. The compiled
step (compiled_decode.py) runs our row-linear and attention kernels from inductor's Python wrapper,
~9 calls per layer plus a pass over the parameters before the graph: ~1 ms of a 5.4 ms step on the
32-layer LLM-heavy model at batch 8 (torch profiler). Here the same kernels run from one C++ loop
over the layers; RMSNorm, RoPE, the SiLU gate and the residual adds are small loops between them.
Steps of more rows than the row kernel takes (`CompiledDecode.few_rows`) multiply on oneDNN's
matmul from the same loop (ATen's where oneDNN did not measure faster, cpu_linear.onednn_faster),
as the compiled step's larger programs do, with the weights packed for oneDNN where the prefill
packed them (packed_weights.py): on the AMD EPYC VM, 32 layers of `cpu-small` weights (104 MB)
multiplied by 9-16 rows in 3.4-4.0 ms packed against 4.8-5.5 ms plain.

Where it applies (`fused_weights`): every layer is a Llama-style one (RMSNorm before attention and
MLP and after the last layer, one fused q/k/v projection with or without bias, optionally
RMS-normed q and k heads, plain o/down projections, a SiLU-gated MLP, the adapter's plain
residuals), every layer attends globally with one rotary table, the model is float32 and our CPU
kernels are built and in use (cpu_attention, cpu_linear). That covers Llama, Mistral, Qwen2,
Qwen3 and the families built on them; Gemma 3 (sliding layers, its own norms and residuals) keeps
the compiled step.

Not bitwise equal to the eager step (RMSNorm and the kernels reduce in their own order): greedy
tokens equal the eager step's in tests/core/test_fused_decode.py, as for the compiled step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lightvlm_core import cpu_attention, forward, packed_weights
from lightvlm_core.compiled_decode import CompiledDecode, op_layout
from lightvlm_core.cpu_linear import onednn_faster, row_kernel_ready
from lightvlm_core.fusion import fused_gate_up, fused_qkv
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.models.base import ModelAdapter
from lightvlm_core.ops import LLAMA_STYLE_RMS_NORMS

log = logging.getLogger(__name__)

_LIBRARY = torch.library.Library("lightvlm", "FRAGMENT")
_LIBRARY.define("decode_layers(Tensor h, Tensor[] input_norms, Tensor[] qkv_weights, Tensor[] qkv_biases, "
                "Tensor[] q_norms, Tensor[] k_norms, Tensor[] o_weights, Tensor[] post_norms, "
                "Tensor[] gate_up_weights, Tensor[] down_weights, Tensor[] matmul_weights, "
                "Tensor cos, Tensor signed_sin, Tensor(a!)[] keys, Tensor(b!)[] values, Tensor(c!) lengths, "
                "Tensor rows, Tensor masks, Tensor plan, Tensor(d!)[] scores, Tensor score_rows, Tensor final_norm, "
                "float eps, float scale, int num_heads, int row_rows, bool onednn) -> Tensor")

SILU_ACTIVATIONS = frozenset({"SiLU", "SiLUActivation"})


@dataclass(frozen=True)
class FusedWeights:
    """Every layer's weights as `lightvlm::decode_layers` takes them (views of the model's own)."""

    input_norms: list[torch.Tensor]
    qkv_weights: list[torch.Tensor]
    qkv_biases: list[torch.Tensor]  # empty: no bias
    q_norms: list[torch.Tensor]  # per-head RMSNorm of q and k before RoPE (Qwen3); empty: none
    k_norms: list[torch.Tensor]
    o_weights: list[torch.Tensor]
    post_norms: list[torch.Tensor]
    gate_up_weights: list[torch.Tensor]
    down_weights: list[torch.Tensor]
    final_norm: torch.Tensor
    eps: float


def _plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear and module.bias is None and module.weight.dtype == torch.float32


def _llama_norm(module: nn.Module) -> bool:
    return type(module).__name__ in LLAMA_STYLE_RMS_NORMS and module.weight.dtype == torch.float32


def fused_weights(adapter: ModelAdapter) -> FusedWeights | None:
    """The layers' weights for the fused step, or None where some layer is not Llama-style (see the
    module docstring) or the model is not float32 on CPU."""
    model = adapter.model
    if model.device.type != "cpu" or model.dtype != torch.float32 or adapter.head_dim not in cpu_attention.HEAD_DIMS:
        return None
    if (type(adapter).attn_residual is not ModelAdapter.attn_residual
            or type(adapter).mlp_residual is not ModelAdapter.mlp_residual):
        return None
    specs = adapter.layer_specs
    if any(spec.attention != "global" for spec in specs) or len({spec.rope for spec in specs}) != 1:
        return None
    d = adapter.head_dim
    sizes = (adapter.num_heads * d, adapter.num_kv_heads * d, adapter.num_kv_heads * d)  # q, k, v
    out: dict[str, list[torch.Tensor]] = {name: [] for name in FusedWeights.__dataclass_fields__
                                       if name not in ("final_norm", "eps")}
    eps: set[float] = set()
    for layer in adapter.layers:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = fused_qkv(attn), fused_gate_up(mlp)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        head_norms = (attn.q_norm, attn.k_norm) if hasattr(attn, "q_norm") else ()
        if (qkv is None or qkv.sizes != sizes or gate_up is None
                or type(mlp.act_fn).__name__ not in SILU_ACTIVATIONS
                or not (_plain_linear(attn.o_proj) and _plain_linear(mlp.down_proj))
                or not all(_llama_norm(norm) for norm in (*norms, *head_norms))):
            return None
        eps.update(norm.variance_epsilon for norm in (*norms, *head_norms))
        if head_norms:
            out["q_norms"].append(attn.q_norm.weight.detach())
            out["k_norms"].append(attn.k_norm.weight.detach())
        out["input_norms"].append(layer.input_layernorm.weight.detach())
        out["qkv_weights"].append(qkv.weight)
        if qkv.bias is not None:
            out["qkv_biases"].append(qkv.bias)
        out["o_weights"].append(attn.o_proj.weight.detach())
        out["post_norms"].append(layer.post_attention_layernorm.weight.detach())
        out["gate_up_weights"].append(gate_up.weight)
        out["down_weights"].append(mlp.down_proj.weight.detach())
    final = adapter.norm
    if not _llama_norm(final) or {final.variance_epsilon} != eps or any(
            len(out[name]) not in (0, len(specs)) for name in ("qkv_biases", "q_norms")):
        return None
    weights = FusedWeights(**out, final_norm=final.weight.detach(), eps=eps.pop())
    tensors = [weights.final_norm, *(t for name in out for t in getattr(weights, name))]
    if not all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors):  # the kernel reads them dense
        return None
    return weights


def _packed_copies(weights: FusedWeights) -> list[torch.Tensor]:
    """The linears' oneDNN-packed copies (packed_weights.py), four per layer as the op takes them
    (q/k/v, o, gate/up, down), or [] where any of them has none."""
    plain = [t for layer in zip(weights.qkv_weights, weights.o_weights, weights.gate_up_weights, weights.down_weights)
             for t in layer]
    copies = [packed_weights.packed(t) for t in plain]
    return copies if all(copy is not t for copy, t in zip(copies, plain)) else []


class FusedDecode:
    """`decode_step.CompiledLayers` with `lightvlm::decode_layers`; `inner` (the compiled step) gives its
    row-kernel limit and score buffers. Built by `of` where the model allows it."""

    def __init__(self, weights: FusedWeights, lm_head_weight: torch.Tensor | None, inner: CompiledDecode) -> None:
        self.weights, self.inner = weights, inner
        self._lm_head_weight = lm_head_weight  # None: the adapter's LM head module
        self._onednn = onednn_faster()  # steps of more rows than the row kernel takes: oneDNN or ATen
        self._matmul_weights = _packed_copies(weights) if self._onednn else []  # []: the plain weights

    @classmethod
    def of(cls, adapter: ModelAdapter, inner: CompiledDecode) -> FusedDecode | None:
        """The fused step for `adapter`'s model, or None where it does not apply (the module
        docstring) or our kernels are not in use (not built, switched off, or measured slower)."""
        if inner.attention != "cpu_decode_attention" or not row_kernel_ready():
            return None
        weights = fused_weights(adapter)
        if weights is None:
            return None
        log.info("decode steps run the fused layers (lightvlm::decode_layers), the row kernel up to %d rows",
                 inner.few_rows)
        head = adapter.lm_head
        return cls(weights, head.weight.detach() if _plain_linear(head) else None, inner)

    def applies(self, adapter: ModelAdapter, cache: BatchedKVCache) -> bool:
        return self.inner.applies(adapter, cache)

    def __call__(self, adapter: ModelAdapter, cache: BatchedKVCache, h: torch.Tensor,
                 ropes: dict[str | None, forward.RopeTables]) -> torch.Tensor | None:
        w = self.weights
        rows, masks, plan = op_layout(cache, masks=False)
        scores, score_rows = self.inner.step_scores(cache)
        (rope,) = ropes.values()
        x = torch.ops.lightvlm.decode_layers(  # the last layer's output, normed
            h[:, 0], w.input_norms, w.qkv_weights, w.qkv_biases, w.q_norms, w.k_norms, w.o_weights, w.post_norms,
            w.gate_up_weights, w.down_weights, self._matmul_weights, rope.cos, rope.signed_sin, cache.keys,
            cache.values, cache.lengths, rows, masks, plan, scores, score_rows, w.final_norm, w.eps, adapter.scaling,
            adapter.num_heads, self.inner.few_rows, self._onednn)
        if self._lm_head_weight is not None and x.shape[0] <= self.inner.few_rows:  # the row kernel
            return torch.ops.lightvlm.row_linear(x, self._lm_head_weight, None)
        return adapter.lm_head(x).float()
