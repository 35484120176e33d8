"""The adapter contract: the load-time check refuses what the forward pass does not implement,
and family-specific parts (Qwen3-VL DeepStack) are load-bearing and travel with their tokens.

Greedy parity, batching, joining mid-decode, reduction and KV policies run for every family in the
shared matrix (test_engine.py, test_reduction.py, test_kv_compression.py, parametrized by FAMILIES).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from lightvlm_core.engine import load_engine
from lightvlm_core.errors import UnsupportedModelError
from lightvlm_core.forward import PrefillState
from lightvlm_core.loading import load_model
from lightvlm_core.models import ADAPTERS, LayerSpec, adapter_for, check_supported
from lightvlm_core.reduction.merger import merge_into
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import GenerationRequest, SamplingParams


def modified_copy(src: Path, dst: Path, **text_changes) -> Path:
    """A copy of a tiny model dir whose text config has `text_changes` applied."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["text_config"].update(text_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_every_tiny_family_has_an_adapter_and_a_cli_choice():
    from lightvlm_core.cli import _parser

    assert set(FAMILIES) <= set(ADAPTERS)
    choices = next(a for a in _parser()._subparsers._group_actions[0].choices["make-tiny"]._actions
                   if a.dest == "family").choices
    assert set(choices) == set(FAMILIES)


@pytest.mark.parametrize("family,changes,feature", [
    ("qwen2_vl", {"use_sliding_window": True, "sliding_window": 8,
                  "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 4}, "sliding-window"),
    ("llava", {"layer_types": ["full_attention"] * 5 + ["chunked_attention"]}, "chunked_attention"),
    ("gemma3", {"attn_logit_softcapping": 50.0}, "attention logit soft-capping"),
    ("gemma3", {"final_logit_softcapping": 30.0}, "final logit soft-capping"),
])
def test_unsupported_config_is_refused_at_load(tiny_model_dir, tmp_path, family, changes, feature):
    path = modified_copy(tiny_model_dir(family), tmp_path / "m", **changes)
    with pytest.raises(UnsupportedModelError, match=f"^{family}: .*{feature}"):
        load_model(str(path), device="cpu")


def test_real_size_default_configs_pass_the_check():
    """transformers' default config of each family (the real model's shapes) builds on the meta
    device and passes the load-time check: the check refuses features, not real models."""
    import transformers

    names = ["LlavaConfig", "Qwen2VLConfig", "Qwen2_5_VLConfig", "InternVLConfig", "Qwen3VLConfig", "Gemma3Config",
             "Idefics3Config", "SmolVLMConfig", "LlavaOnevisionConfig", "Mistral3Config"]
    families = []
    for name in names:
        with torch.device("meta"):
            model = transformers.AutoModelForImageTextToText.from_config(getattr(transformers, name)())
        families.append(adapter_for(model).family)
    assert sorted(families) == sorted(FAMILIES)


@pytest.fixture(scope="module")
def qwen3(tiny_model_dir):
    return load_model(str(tiny_model_dir("qwen3_vl")), device="cpu")


def test_unknown_layer_class_extra_norm_and_other_norm_are_refused(qwen3):
    adapter = ADAPTERS["qwen3_vl"](qwen3.model)
    check_supported(adapter)  # the real model passes
    layers = adapter.layers
    original = layers[1]
    try:
        layers[1] = nn.Sequential(original)
        with pytest.raises(UnsupportedModelError, match="qwen3_vl: .*layer 1: decoder layer class Sequential"):
            check_supported(adapter)
        layers[1] = original
        original.extra_norm = nn.LayerNorm(64)
        with pytest.raises(UnsupportedModelError, match=r"layer 1: unexpected layer parts \['extra_norm'\]"):
            check_supported(adapter)
        del original.extra_norm
        norm = original.input_layernorm
        original.input_layernorm = nn.LayerNorm(64)
        with pytest.raises(UnsupportedModelError, match="layer 1: norm input_layernorm is LayerNorm"):
            check_supported(adapter)
        original.input_layernorm = norm
    finally:
        layers[1] = original
    check_supported(adapter)


def scene(w: int, h: int) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 240, 240))
    img.paste((200, 30, 30), (w // 4, h // 4, w // 2, h // 2))
    return img


def test_deepstack_is_load_bearing(tiny_model_dir):
    """Without the DeepStack injections the image answer changes: the parity test really covers them."""
    engine = load_engine(str(tiny_model_dir("qwen3_vl")), device="cpu")
    request = GenerationRequest("What is in the image?", [scene(128, 96)], SamplingParams(max_new_tokens=8))
    with_deepstack = engine.generate([request])[0].token_ids
    engine.adapter.inject = lambda layer, h, carry: h
    try:
        without = engine.generate([request])[0].token_ids
    finally:
        del engine.adapter.inject
    assert without != with_deepstack


def test_gemma3_window_and_bidirectional_images_are_load_bearing(tiny_model_dir):
    """Turning off the sliding window or the bidirectional image mask changes the answers, so the
    parity tests really cover both (the tiny window, 16, is shorter than the test prompts)."""
    engine = load_engine(str(tiny_model_dir("gemma3")), device="cpu")
    adapter = engine.adapter
    requests = [GenerationRequest("What is in the image?", [scene(64, 48)], SamplingParams(max_new_tokens=12)),
                GenerationRequest("Compare the two pictures.", [scene(64, 48), scene(40, 96)],
                                  SamplingParams(max_new_tokens=12))]

    def answers():
        return [r.token_ids for r in engine.generate(requests)]

    base = answers()
    specs = adapter.layer_specs
    assert [s.attention for s in specs] == ["sliding"] * 5 + ["global"] and specs[0].window == 16
    try:
        adapter.bidirectional_images = False
        assert answers() != base
        adapter.bidirectional_images = True
        adapter.layer_specs = [LayerSpec(rope=s.rope) for s in specs]
        assert answers() != base
    finally:
        adapter.bidirectional_images, adapter.layer_specs = True, specs


def test_llava_onevision_rows_with_different_tile_counts_batch_like_alone(tiny_model_dir):
    engine = load_engine(str(tiny_model_dir("llava_onevision")), device="cpu")
    images = [scene(64, 48), scene(40, 96), scene(28, 28)]
    tiles = [engine.processor.image_processor(images=[im], return_tensors="pt")["pixel_values"].shape[1]
             for im in images]
    assert len(set(tiles)) == 3  # 5, 3 and 2 tiles (base view included)
    requests = [GenerationRequest("What is in the image?", [im], SamplingParams(max_new_tokens=6, ignore_eos=True))
                for im in images]
    together = [r.token_ids for r in engine.generate(requests)]
    assert together == [engine.generate([r])[0].token_ids for r in requests]


def test_mistral_sliding_window_on_every_layer_matches_transformers(tiny_model_dir, tmp_path):
    """Mistral applies `sliding_window` to every layer (no layer_types); a window of 8, shorter
    than the prompts, still gives HF's tokens, with and without an image."""
    from test_engine import hf_greedy, run

    path = modified_copy(tiny_model_dir("mistral3"), tmp_path / "m", sliding_window=8)
    engine = load_engine(str(path), device="cpu")
    assert {(s.attention, s.window) for s in engine.adapter.layer_specs} == {("sliding", 8)}
    for prompt, images in [("What is in the image?", [scene(64, 48)]), ("Tell me a story about a cat.", [])]:
        assert run(engine, prompt, images, 12).token_ids == hf_greedy(engine, prompt, images, 12)


def test_prefill_mask_windows_by_original_position_and_opens_each_image():
    """After reduction the kept tokens keep their positions: the window is measured in positions,
    not in kept-token indices; image tokens see their own image both ways, never another image."""
    from types import SimpleNamespace

    from lightvlm_core.forward import prefill_mask

    # row tokens (after a cut): text@0, image A @1,2 (span 0), image B @7,8 (span 1), text@9
    state = PrefillState(h=torch.zeros(1, 6, 4), valid=torch.ones(1, 6, dtype=torch.bool),
                         pos=torch.tensor([[0, 1, 2, 7, 8, 9]]), span=torch.tensor([[-1, 0, 0, 1, 1, -1]]),
                         size=torch.ones(1, 6))
    bidirectional = SimpleNamespace(bidirectional_images=True)
    full = prefill_mask(bidirectional, LayerSpec(), state)[0, 0]
    assert full[1, 2] and full[3, 4] and not full[2, 3] and not full[0, 1]  # within an image only
    window = prefill_mask(bidirectional, LayerSpec("sliding", 3), state)[0, 0]
    # query @9 sees positions > 6: 7, 8, 9 (3 tokens), not 2 although it is only 3 kept tokens back
    assert window[5].tolist() == [False, False, False, True, True, True]
    causal = prefill_mask(SimpleNamespace(bidirectional_images=False), LayerSpec(), state)[0, 0]
    assert torch.equal(causal, torch.ones(6, 6, dtype=torch.bool).tril())


def test_carry_features_are_gathered_and_merged_with_their_tokens():
    b, t, d = 1, 5, 4
    deepstack = torch.arange(b * t * 2 * d, dtype=torch.float32).view(b, t, 2, d)
    state = PrefillState(h=torch.randn(b, t, d), valid=torch.ones(b, t, dtype=torch.bool),
                         pos=torch.arange(t)[None], span=torch.tensor([[-1, 0, 0, 0, -1]]),
                         size=torch.ones(b, t), carry={"deepstack": deepstack.clone()})
    kept = state.gather(torch.tensor([[0, 2, 4]]), torch.ones(1, 3, dtype=torch.bool))
    assert torch.equal(kept.carry["deepstack"], deepstack[:, [0, 2, 4]])
    # merge token 1 into token 2 (the only destination) with equal weights: plain average
    merge_into(state, 0, torch.tensor([1]), torch.tensor([2]), torch.ones(t))
    assert torch.allclose(state.carry["deepstack"][0, 2], (deepstack[0, 1] + deepstack[0, 2]) / 2)
    assert torch.equal(state.carry["deepstack"][0, [0, 3, 4]], deepstack[0, [0, 3, 4]])
