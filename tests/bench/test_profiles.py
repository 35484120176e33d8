"""Benchmark profiles have the shapes they claim (GPU ones checked on the meta device, no weights)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

from lightvlm_core.bench import profiles
from lightvlm_core.tiny import internvl, qwen_vl


def config_of(profile):
    if profile.family == "internvl":
        return profiles._internvl(profile, internvl.internvl_tokenizer())
    return profiles._qwen2_vl(profile, qwen_vl.qwen_vl_tokenizer())


@pytest.mark.parametrize("name,billions", [("gpu-8b", (7.0, 8.5)), ("gpu-26b", (24.0, 27.0)),
                                           ("qwen2vl-7b", (7.0, 8.5))])
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
