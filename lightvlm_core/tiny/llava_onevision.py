"""Tiny LLaVA-OneVision: SigLIP tower (28 px tiles, patch 7 -> 16 features per tile), Qwen2 text
model, any-resolution tiling over a 1x1..2x2 grid of 28 px tiles plus the base view, unpadded to
the image's aspect ratio with an image-newline feature after every row. The token count follows
the image's size and shape, so images in one batch have different tile counts."""

from __future__ import annotations

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionImageProcessor,
    LlavaOnevisionProcessor,
    LlavaOnevisionVideoProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    SiglipVisionConfig,
)

from lightvlm_core.tiny.common import INIT_RANGE, TEXT_DIMS, TinyFamily, chatml_template, qwen_tokenizer, token_ids

TILE, PATCH = 28, 7
PINPOINTS = [[TILE * r, TILE * c] for r in (1, 2) for c in (1, 2)]
OV_NAMED = {"image_token": "<image>", "video_token": "<video>"}
OV_CHAT_TEMPLATE = chatml_template("<image>\n", "<video>\n", default_system=None)


def _tokenizer() -> Qwen2Tokenizer:
    return qwen_tokenizer(OV_NAMED, [])


def _processor(tokenizer: Qwen2Tokenizer) -> LlavaOnevisionProcessor:
    size = {"height": TILE, "width": TILE}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=PINPOINTS),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(TILE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=OV_CHAT_TEMPLATE,
    )


def _config(tokenizer: Qwen2Tokenizer) -> LlavaOnevisionConfig:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=TILE, patch_size=PATCH, initializer_range=INIT_RANGE)
    text = Qwen2Config(**TEXT_DIMS, **token_ids(tokenizer), tie_word_embeddings=False)
    ids = tokenizer.convert_tokens_to_ids
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids("<image>"),
        video_token_index=ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=PINPOINTS,
        tie_word_embeddings=False,
    )


LLAVA_ONEVISION = TinyFamily(_tokenizer, _processor, _config)
