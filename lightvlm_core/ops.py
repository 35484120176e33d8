"""Small kernels of the forward pass, cheaper than the HF modules they stand for and bitwise equal
to them (checked on CPU in fp32, bf16 and fp16: tests/core/test_ops.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# RMSNorm classes whose forward is exactly weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype)
LLAMA_STYLE_RMS_NORMS = frozenset({"LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm",
                                   "Qwen2_5_VLRMSNorm", "Qwen2VLRMSNorm", "Qwen3VLTextRMSNorm"})


def rms_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for an RMSNorm module; one fused op instead of seven for the Llama-style ones.
    Only on CPU, where equality with the HF module is verified; elsewhere the module itself runs."""
    if x.device.type == "cpu" and type(module).__name__ in LLAMA_STYLE_RMS_NORMS:
        if x.dtype == module.weight.dtype == torch.float32:  # the weight multiply fused in: same product
            return F.rms_norm(x, (x.shape[-1],), module.weight, eps=module.variance_epsilon)
        return module.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=module.variance_epsilon).to(x.dtype)
    return module(x)
