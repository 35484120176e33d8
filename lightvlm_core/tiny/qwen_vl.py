"""Tiny Qwen2-VL / Qwen2.5-VL: 3-row M-RoPE text model, `Qwen2VLProcessor` with small
min/max_pixels, so the image-token count follows the input size (4..64 tokens, 28 px each)."""

from __future__ import annotations

from collections.abc import Callable

from transformers import (
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from lightvlm_core.tiny.common import INIT_RANGE, TEXT_DIMS, TinyFamily, chatml_template, qwen_tokenizer, token_ids

QWEN_FACTOR = 28
QWEN_MIN_PIXELS = QWEN_FACTOR * QWEN_FACTOR * 4
QWEN_MAX_PIXELS = QWEN_FACTOR * QWEN_FACTOR * 64

QWEN_CHAT_TEMPLATE = chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|vision_start|><|video_pad|><|vision_end|>",
    default_system="You are a helpful assistant.",
)


def qwen_vl_tokenizer() -> Qwen2Tokenizer:
    return qwen_tokenizer({}, [])


def qwen_processor(cls: type[ProcessorMixin], image_processor=Qwen2VLImageProcessor,
                   video_processor=Qwen2VLVideoProcessor, factor: int = QWEN_FACTOR
                   ) -> Callable[[Qwen2Tokenizer], ProcessorMixin]:
    """A builder of `cls` with small pixel bounds: 4..64 image tokens of `factor` px each."""
    def build(tokenizer: Qwen2Tokenizer) -> ProcessorMixin:
        pixels = dict(min_pixels=factor * factor * 4, max_pixels=factor * factor * 64)
        return cls(
            image_processor=image_processor(**pixels),
            tokenizer=tokenizer,
            video_processor=video_processor(**pixels),
            chat_template=QWEN_CHAT_TEMPLATE,
        )

    return build


def qwen_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def qwen_text(tokenizer: Qwen2Tokenizer) -> dict:
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width).
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    return dict(**TEXT_DIMS, **token_ids(tokenizer), rope_parameters=rope)


def _qwen2_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2VLConfig:
    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=TEXT_DIMS["hidden_size"],
        num_heads=2,
        mlp_ratio=2,
        patch_size=QWEN_FACTOR // 2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        initializer_range=INIT_RANGE,
    )
    return Qwen2VLConfig(text_config=qwen_text(tokenizer), vision_config=vision, **qwen_ids(tokenizer))


def _qwen2_5_vl_config(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLConfig:
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=TEXT_DIMS["hidden_size"],
        patch_size=QWEN_FACTOR // 2,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,  # 4x4 merged tokens per window, as in the real model
        fullatt_block_indexes=[1],
        initializer_range=INIT_RANGE,
    )
    return Qwen2_5_VLConfig(text_config=qwen_text(tokenizer), vision_config=vision, **qwen_ids(tokenizer))


QWEN2_VL = TinyFamily(qwen_vl_tokenizer, qwen_processor(Qwen2VLProcessor), _qwen2_vl_config)
QWEN2_5_VL = TinyFamily(qwen_vl_tokenizer, qwen_processor(Qwen2_5_VLProcessor), _qwen2_5_vl_config)
