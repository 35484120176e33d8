"""The fused kernels in lightvlm_core/ops.py are bitwise equal to the HF modules they replace."""

from __future__ import annotations

import importlib

import pytest
import torch

from lightvlm_core.ops import LLAMA_STYLE_RMS_NORMS, rms_norm

MODULES = {"LlamaRMSNorm": "llama", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3", "MistralRMSNorm": "mistral",
           "Qwen2VLRMSNorm": "qwen2_vl", "Qwen2_5_VLRMSNorm": "qwen2_5_vl", "Qwen3VLTextRMSNorm": "qwen3_vl"}


@pytest.mark.parametrize("name", sorted(LLAMA_STYLE_RMS_NORMS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rms_norm_is_bitwise_the_hf_module(name: str, dtype: torch.dtype) -> None:
    cls = getattr(importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}"), name)
    torch.manual_seed(0)
    module = cls(96, eps=1e-5).to(dtype)
    module.weight.data = torch.randn(96).to(dtype)
    for scale in (1e-3, 1.0, 40.0):
        x = (torch.randn(3, 5, 96) * scale).to(dtype)
        assert torch.equal(rms_norm(module, x), module(x))


def test_other_norms_run_as_they_are() -> None:
    norm = torch.nn.LayerNorm(8)
    x = torch.randn(2, 8)
    assert torch.equal(rms_norm(norm, x), norm(x))
