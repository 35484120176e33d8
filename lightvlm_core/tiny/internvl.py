"""Tiny InternVL: the transformers-native `InternVLForConditionalGeneration` (`-hf` checkpoint
format, Qwen2 text model), `InternVLProcessor` with 56px tiles, crop_to_patches and pixel shuffle
-> 16 image tokens per tile, 1..7 tiles per image."""

from __future__ import annotations

from transformers import (
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    Qwen2Config,
    Qwen2Tokenizer,
)

from lightvlm_core.tiny.common import INIT_RANGE, TEXT_DIMS, TinyFamily, chatml_template, qwen_tokenizer, token_ids

INTERNVL_TILE, INTERNVL_PATCH, INTERNVL_MAX_TILES = 56, 7, 6
INTERNVL_TOKENS_PER_TILE = (INTERNVL_TILE // INTERNVL_PATCH) ** 2 // 4
INTERNVL_NAMED = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_OTHER = ["<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
INTERNVL_CHAT_TEMPLATE = chatml_template("<IMG_CONTEXT>\n", "<video>\n", default_system=None)


def internvl_tokenizer() -> Qwen2Tokenizer:
    return qwen_tokenizer(INTERNVL_NAMED, INTERNVL_OTHER)


def _processor(tokenizer: Qwen2Tokenizer) -> InternVLProcessor:
    tile = {"height": INTERNVL_TILE, "width": INTERNVL_TILE}
    image_processor = GotOcr2ImageProcessor(
        size=tile, crop_to_patches=True, min_patches=1, max_patches=INTERNVL_MAX_TILES
    )
    return InternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )


def _config(tokenizer: Qwen2Tokenizer) -> InternVLConfig:
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=INTERNVL_TILE,
        patch_size=INTERNVL_PATCH,
        initializer_range=INIT_RANGE,
    )
    text = Qwen2Config(**TEXT_DIMS, **token_ids(tokenizer), tie_word_embeddings=False)
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


INTERNVL = TinyFamily(internvl_tokenizer, _processor, _config)
