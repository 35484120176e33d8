"""Benchmark profiles have the shapes they claim (GPU ones checked on the meta device, no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from lightvlm_core.bench import profiles


def config_of(profile):
    return profiles.processor_and_config(profile)[1]


@pytest.mark.parametrize("name,billions", [("gpu-8b", (7.0, 8.5)), ("gpu-26b", (24.0, 27.0)),
                                           ("qwen2vl-7b", (7.0, 8.5)),
                                           # Qwen3-VL-8B: 8.77B with its real 151,936-token vocabulary
                                           ("qwen3vl-8b", (7.4, 7.6))])
def test_gpu_profiles_have_real_model_sizes(name, billions):
    processor, config = config_of(profiles.PROFILES[name])
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    # vocabularies are tiny here (built offline), so count everything but the embeddings
    n = sum(p.numel() for n_, p in model.named_parameters() if "embed_tokens" not in n_ and "lm_head" not in n_)
    assert billions[0] * 1e9 < n < billions[1] * 1e9


@pytest.mark.parametrize("name,expected", [("cpu-small", 13 * 64), ("gpu-8b", 13 * 256)])
def test_internvl_profiles_tile_the_bench_image(name, expected):
    profile = profiles.PROFILES[name]
    processor, _ = config_of(profile)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}], add_generation_prompt=True)
    ids = processor(images=[profiles.bench_image(profile)], text=[text], return_tensors="pt")["input_ids"][0]
    assert int((ids == processor.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")).sum()) == expected


def test_qwen3vl_profile_builds_and_prefills_when_shrunk():
    """The qwen3vl-8b build path (processor, config, adapter, DeepStack) runs end to end on CPU at tiny width."""
    from dataclasses import replace

    from lightvlm_core.engine import Engine
    from lightvlm_core.types import GenerationRequest, SamplingParams

    small = replace(profiles.PROFILES["qwen3vl-8b"], device="cpu", dtype="float32", image_size=(128, 96),
                    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16),
                    vision=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                num_position_embeddings=64, deepstack_visual_indexes=[0, 1, 2]))
    loaded = profiles.build(small)
    assert loaded.adapter.family == "qwen3_vl"
    request = GenerationRequest("hi", [profiles.bench_image(small)], SamplingParams(max_new_tokens=2, ignore_eos=True))
    result = Engine(loaded).generate([request])[0]
    assert len(result.token_ids) == 2 and result.usage.image_tokens == 12  # 128x96 -> 4x3 merged tokens
