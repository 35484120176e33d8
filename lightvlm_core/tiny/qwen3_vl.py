"""Tiny Qwen3-VL: Qwen3 text decoder (q/k norms, interleaved 3-row M-RoPE) and a vision tower
whose DeepStack features from 3 vision layers are added into the first 3 LLM layers. 32 px per
image token (patch 16, 2x2 merge), 4..64 image tokens per image."""

from __future__ import annotations

from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from lightvlm_core.tiny.common import INIT_RANGE, TEXT_DIMS, TinyFamily, chatml_template, token_ids
from lightvlm_core.tiny.qwen_vl import qwen_ids, qwen_vl_tokenizer

QWEN3_PATCH, QWEN3_MERGE = 16, 2
QWEN3_FACTOR = QWEN3_PATCH * QWEN3_MERGE
QWEN3_CHAT_TEMPLATE = chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>", default_system=None
)


def _processor(tokenizer: Qwen2Tokenizer) -> Qwen3VLProcessor:
    size = {"shortest_edge": QWEN3_FACTOR**2 * 4, "longest_edge": QWEN3_FACTOR**2 * 64}
    return Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size, patch_size=QWEN3_PATCH, merge_size=QWEN3_MERGE),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(size=size, patch_size=QWEN3_PATCH, merge_size=QWEN3_MERGE),
        chat_template=QWEN3_CHAT_TEMPLATE,
    )


def _config(tokenizer: Qwen2Tokenizer) -> Qwen3VLConfig:
    # head_dim 16 -> 8 rotary frequencies, interleaved over (temporal, height, width)
    rope = {"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    text = dict(**TEXT_DIMS, **token_ids(tokenizer), head_dim=16, rope_parameters=rope)
    vision = dict(
        depth=3,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=TEXT_DIMS["hidden_size"],
        patch_size=QWEN3_PATCH,
        spatial_merge_size=QWEN3_MERGE,
        temporal_patch_size=2,
        num_position_embeddings=64,  # an 8x8 learned grid, interpolated to each image's size
        deepstack_visual_indexes=[0, 1, 2],
        initializer_range=INIT_RANGE,
    )
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **qwen_ids(tokenizer))


QWEN3_VL = TinyFamily(qwen_vl_tokenizer, _processor, _config)
