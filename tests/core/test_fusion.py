"""q/k/v and gate/up fused into one GEMM each (lightvlm_core/fusion.py): bitwise equal to the
separate projections on CPU, one copy of the weights, and the same logits on every family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.fusion import GATE_UP_ATTR, QKV_ATTR, fuse_linears
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import GenerationRequest, SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 8, 265, 2120])
@pytest.mark.parametrize("sizes", [(256, 128, 128), (640, 640), (64, 32, 32)])
def test_fused_product_is_bitwise_the_separate_ones(dtype, rows, sizes) -> None:
    torch.manual_seed(rows)
    k = 256
    modules = [nn.Linear(k, n, bias=bool(rows % 2), dtype=dtype) for n in sizes]
    x = torch.randn(rows, k, dtype=dtype)
    separate = [F.linear(x, m.weight, m.bias) for m in modules]
    fused = fuse_linears(modules)
    assert fused is not None
    for got, want, module in zip(fused(x), separate, modules):
        assert torch.equal(got, want)
        assert torch.equal(module(x), want)  # the modules still work, on views of the fused weight
        assert module.weight.untyped_storage().data_ptr() == fused.weight.untyped_storage().data_ptr()


def test_modules_that_cannot_share_a_gemm_are_left_alone() -> None:
    assert fuse_linears([nn.Linear(8, 4), nn.Linear(16, 4)]) is None  # different inputs
    assert fuse_linears([nn.Linear(8, 4), nn.Linear(8, 4, bias=False)]) is None  # bias on one only
    assert fuse_linears([nn.Linear(8, 4), nn.Linear(8, 4, dtype=torch.bfloat16)]) is None
    assert fuse_linears([nn.Linear(8, 4), nn.Identity()]) is None


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir(request.param)), device="cpu")


def _set_fused(engine: Engine, saved: list[tuple], on: bool) -> None:
    for layer, (qkv, gate_up) in zip(engine.runner.adapter.layers, saved):
        for module, attr, value in ((layer.self_attn, QKV_ATTR, qkv), (layer.mlp, GATE_UP_ATTR, gate_up)):
            if on and value is not None:
                module.__dict__[attr] = value
            else:
                module.__dict__.pop(attr, None)


def test_every_family_is_fused_and_decodes_the_same_logits(engine: Engine) -> None:
    layers = engine.runner.adapter.layers
    saved = [(layer.self_attn.__dict__.get(QKV_ATTR), layer.mlp.__dict__.get(GATE_UP_ATTR)) for layer in layers]
    assert all(qkv is not None and gate_up is not None for qkv, gate_up in saved)  # every tiny family fuses

    image = Image.new("RGB", (64, 48), (200, 30, 30))
    requests = [GenerationRequest(p, [image], SamplingParams(max_new_tokens=6, ignore_eos=True))
                for p in ("What is this?", "Describe the picture in a few words.")]

    def run(fused: bool) -> list[torch.Tensor]:
        _set_fused(engine, saved, fused)
        logits = []
        original = engine.runner._sample

        def spy(rows, step_logits, out):
            logits.append(step_logits.clone())
            return original(rows, step_logits, out)

        engine.runner._sample = spy
        try:
            engine.generate(requests)
        finally:
            engine.runner._sample = original
        return logits

    try:
        separate, fused = run(False), run(True)
    finally:
        _set_fused(engine, saved, True)
    assert len(separate) == len(fused) > 1
    assert all(torch.equal(a, b) for a, b in zip(separate, fused))
