"""Sibling projections fused into one matrix multiply: q/k/v of attention, gate/up of the MLP.

One GEMM over the concatenated weights instead of two or three: fewer kernels per layer, which is
most of a small model's decode step, and a wider GEMM in prefill. The separate modules keep
working: their weights become views into the fused tensor, so the weights stay one copy in memory.

CPU only: there the fused product is bitwise equal to the separate ones (tests/core/test_fusion.py),
so parity with transformers is untouched. GPU GEMMs may pick different kernels for a wider matrix,
and that has not been verified on a GPU yet.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

QKV_ATTR = "lightvlm_fused_qkv"
GATE_UP_ATTR = "lightvlm_fused_gate_up"
# MLP classes whose forward is exactly down_proj(act_fn(gate_proj(x)) * up_proj(x))
GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP", "Qwen3VLTextMLP", "Gemma3MLP"})


@dataclass(frozen=True)
class FusedLinear:
    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: tuple[int, ...]

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The fused output: (..., sum(sizes))."""
        return F.linear(x, self.weight, self.bias)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.project(x).split(self.sizes, dim=-1)


def fuse_linears(modules: list[nn.Module]) -> FusedLinear | None:
    """Fuse plain nn.Linear modules that read the same input; None where they cannot share a GEMM."""
    if not all(type(m) is nn.Linear for m in modules):
        return None
    weights = [m.weight for m in modules]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or weights[0].device.type != "cpu":
        return None
    biases = [m.bias for m in modules]
    if any(b is None for b in biases) != all(b is None for b in biases):
        return None
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = None if biases[0] is None else torch.cat([b.detach() for b in biases])
    sizes = tuple(w.shape[0] for w in weights)
    start = 0
    for module, n in zip(modules, sizes):
        module.weight = nn.Parameter(weight[start:start + n], requires_grad=module.weight.requires_grad)
        if bias is not None:
            module.bias = nn.Parameter(bias[start:start + n], requires_grad=module.bias.requires_grad)
        start += n
    return FusedLinear(weight, bias, sizes)


def fuse_decoder_layers(layers: nn.ModuleList) -> None:
    """Fuse q/k/v and gate/up of every decoder layer where possible (the rest stays as it is)."""
    for layer in layers:
        attn = layer.self_attn
        qkv = fuse_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        if qkv is not None:
            attn.__dict__[QKV_ATTR] = qkv
        mlp = layer.mlp
        if type(mlp).__name__ in GATED_MLPS:
            gate_up = fuse_linears([mlp.gate_proj, mlp.up_proj])
            if gate_up is not None:
                mlp.__dict__[GATE_UP_ATTR] = gate_up


def fused_qkv(attn: nn.Module) -> FusedLinear | None:
    return attn.__dict__.get(QKV_ATTR)


def fused_gate_up(mlp: nn.Module) -> FusedLinear | None:
    return mlp.__dict__.get(GATE_UP_ATTR)


def fused_linears(module: nn.Module) -> list[FusedLinear]:
    """The fused projections `module` itself holds (an attention's q/k/v, an MLP's gate/up)."""
    return [module.__dict__[attr] for attr in (QKV_ATTR, GATE_UP_ATTR) if attr in module.__dict__]


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    fused = fused_qkv(attn)
    if fused is None:
        return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    return fused(x)


def mlp(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for a decoder layer's MLP, with gate and up in one GEMM where fused."""
    fused = fused_gate_up(module)
    if fused is None:
        return module(x)
    gate, up = fused(x)
    return module.down_proj(module.act_fn(gate) * up)
