"""Tiny LLaVA: `LlavaForConditionalGeneration` (CLIP vision + Llama text), `LlavaProcessor`,
56x56 images with patch 7 -> 64 image tokens (the CLS token is dropped)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaImageProcessor,
    LlavaProcessor,
    TokenizersBackend,
)

from lightvlm_core.tiny.common import (
    INIT_RANGE,
    TEXT_DIMS,
    TinyFamily,
    byte_pre_tokenizer,
    token_ids,
    train_byte_bpe,
    with_specials,
)

LLAVA_IMAGE_SIZE, LLAVA_PATCH = 56, 7

LLAVA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'] | upper }}{{ ': ' }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] + ' ' }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] + ' ' }}{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def llama_tokenizer(extra_specials: dict[str, str] | None = None) -> TokenizersBackend:
    """Llama-style special tokens (<unk>, <s>, </s> first; <image>, <pad> last) on a byte-level BPE."""
    vocab, merges = train_byte_bpe()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: i + 3 for t, i in vocab.items()}}
    vocab = with_specials(vocab, ["<image>", "<pad>"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return TokenizersBackend(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def _processor(tokenizer: TokenizersBackend) -> LlavaProcessor:
    image_processor = LlavaImageProcessor(
        size={"shortest_edge": LLAVA_IMAGE_SIZE},
        crop_size={"height": LLAVA_IMAGE_SIZE, "width": LLAVA_IMAGE_SIZE},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped again by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def _config(tokenizer: TokenizersBackend) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=LLAVA_IMAGE_SIZE,
        patch_size=LLAVA_PATCH,
        projection_dim=32,
        initializer_range=INIT_RANGE,
    )
    text = LlamaConfig(**TEXT_DIMS, **token_ids(tokenizer))
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


LLAVA = TinyFamily(tokenizer=llama_tokenizer, processor=_processor, config=_config)
