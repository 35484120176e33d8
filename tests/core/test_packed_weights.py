"""Weights packed into oneDNN's layout for the compiled prefill (lightvlm_core/packed_weights.py):
the packed product equals the plain one, a weight written to or freed has no copy left, the setting
and the memory check decide, and the prefill's weights are the fused projections, not their views."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

import numpy as np
from PIL import Image

from lightvlm_core import packed_weights
from lightvlm_core.compiled_prefill import CompiledPrefill, vision_modules
from lightvlm_core.cpu_linear import OneDnnLinear, _onednn_linear, onednn_faster
from lightvlm_core.engine import Engine
from lightvlm_core.fusion import fused_linears
from lightvlm_core.runner import load_runner
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import GenerationRequest, SamplingParams

ON = {"LIGHTVLM_PACKED_WEIGHTS": "true"}


@pytest.mark.parametrize("rows", [1, 7, 100, 257])
@pytest.mark.parametrize("bias", [False, True])
def test_the_packed_product_equals_the_plain_one(rows, bias) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 64, generator=gen)
    b = torch.randn(96, generator=gen) if bias else None
    x = torch.randn(2, rows, 64, generator=gen)  # leading dims as a prefill's (batch, tokens, width)
    assert packed_weights.pack([weight], ON) == weight.numel() * 4
    assert packed_weights.packed(weight) is not weight
    assert packed_weights.packed(weight).layout == torch._mkldnn
    torch.testing.assert_close(_onednn_linear(x, weight, b), F.linear(x, weight, b), atol=1e-4, rtol=1e-4)


def test_a_weight_written_to_is_multiplied_as_it_is_now() -> None:
    weight, x = torch.randn(32, 16), torch.randn(5, 16)
    packed_weights.pack([weight], ON)
    with torch.no_grad():
        weight.mul_(2)
    assert packed_weights.packed(weight) is weight
    torch.testing.assert_close(_onednn_linear(x, weight, None), F.linear(x, weight), atol=1e-4, rtol=1e-4)


def test_a_freed_weight_leaves_no_copy() -> None:
    weights = [torch.randn(32, 16) for _ in range(3)]
    keys = [packed_weights._key(w) for w in weights]
    packed_weights.pack(weights, ON)
    assert all(key in packed_weights._PACKED for key in keys)
    del weights
    gc.collect()
    assert not any(key in packed_weights._PACKED for key in keys)


def test_the_setting_and_the_memory_check_decide(monkeypatch) -> None:
    weight = torch.randn(64, 64)  # 16 KiB
    assert packed_weights.pack([weight], {"LIGHTVLM_PACKED_WEIGHTS": "false"}) == 0
    assert packed_weights.packed(weight) is weight
    monkeypatch.setattr(packed_weights, "available_memory_bytes", lambda: 60 * 1024)  # a quarter: 15 KiB
    assert packed_weights.pack([weight], {}) == 0  # auto: the copies would not fit
    assert packed_weights.packed(weight) is weight
    assert packed_weights.pack([weight], ON) == 64 * 64 * 4  # true: packed whatever memory says
    monkeypatch.setattr(packed_weights, "available_memory_bytes", lambda: 64 * 1024)
    assert packed_weights.pack([torch.randn(64, 64)], {"LIGHTVLM_PACKED_WEIGHTS": "auto"}) == 64 * 64 * 4
    with pytest.raises(ValueError, match="LIGHTVLM_PACKED_WEIGHTS"):
        packed_weights.setting({"LIGHTVLM_PACKED_WEIGHTS": "sometimes"})


def test_available_memory_is_read_from_this_machine() -> None:
    available = packed_weights.available_memory_bytes()
    assert available is not None and 0 < available < 2**50


def test_the_prefill_weights_are_the_fused_projections_and_the_other_linears(tiny_model_dir) -> None:
    adapter = load_runner(str(tiny_model_dir("llava")), device="cpu").adapter
    weights = packed_weights.prefill_weights(adapter.layers)
    keys = {packed_weights._key(w) for w in weights}
    for layer in adapter.layers:
        fused = fused_linears(layer.self_attn) + fused_linears(layer.mlp)
        assert len(fused) == 2  # q/k/v and gate/up
        for wanted in [f.weight for f in fused] + [layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight]:
            assert packed_weights._key(wanted) in keys
        for view in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.mlp.up_proj):
            assert packed_weights._key(view.weight) not in keys  # slices of a fused weight: never multiplied
    assert len(weights) == 4 * len(adapter.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_eager_vision_tower_computes_on_the_packed_weights_with_the_same_features(family, tiny_model_dir,
                                                                                      monkeypatch) -> None:
    """Towers that run eagerly (a patch count that varies per image) compute their linears on
    oneDNN with the packed weights where the prefill does; compiled towers have the mode inside."""
    runner = load_runner(str(tiny_model_dir(family)), device="cpu")
    adapter = runner.adapter
    eager_tower = adapter.fixed_size_vision_tower is None
    context = CompiledPrefill(adapter).eager_vision()
    assert isinstance(context, OneDnnLinear) == (eager_tower and onednn_faster())
    if not eager_tower:
        return
    packed_weights.pack(packed_weights.prefill_weights(vision_modules(adapter)), ON)
    pixels = (np.random.default_rng(0).random((80, 112, 3)) * 255).astype("uint8")
    request = GenerationRequest("What is in the picture?", [Image.fromarray(pixels)], SamplingParams(max_new_tokens=1))
    prompt = Engine(runner).prepare(request).prompt.prompt
    plain = adapter.embed_with_carry([prompt], runner.device, torch.float32)[0][0]
    found = []
    real = packed_weights.packed

    def spy(weight):
        found.append(real(weight) is not weight)
        return real(weight)

    monkeypatch.setattr(packed_weights, "packed", spy)
    with OneDnnLinear():
        onednn = adapter.embed_with_carry([prompt], runner.device, torch.float32)[0][0]
    assert found and all(found)
    torch.testing.assert_close(onednn, plain, atol=1e-4, rtol=1e-4)
