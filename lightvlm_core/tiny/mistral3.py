"""Tiny Mistral 3: Pixtral vision tower (2-D RoPE, patch 7, any aspect ratio up to 112 px) + patch
merger (2x2) projector + Mistral text model. Each image becomes rows of [IMG] tokens, each row
ended by [IMG_BREAK] and the image by [IMG_END]: one 14 px x 14 px cell per image token."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import (
    Mistral3Config,
    MistralConfig,
    PixtralImageProcessor,
    PixtralProcessor,
    PixtralVisionConfig,
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

PATCH, MERGE, LONGEST = 7, 2, 112
IMAGE_TOKENS = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]

# "<s>[INST]<images>question[/INST]" as in Mistral-Small-3.1 (images before the text of a turn)
MISTRAL3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ eos_token }}"
    "{%- else -%}{{ '[INST]' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '[IMG]' }}{%- endfor -%}"
    "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    "{%- endif -%}{{ '[/INST]' }}{%- endif -%}"
    "{%- endfor -%}"
)


def _tokenizer() -> TokenizersBackend:
    """Mistral-style specials (<unk>, <s>, </s>, [INST], [/INST], image tokens) on a byte-level BPE."""
    vocab, merges = train_byte_bpe()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: i + 3 for t, i in vocab.items()}}
    vocab = with_specials(vocab, ["[INST]", "[/INST]", *IMAGE_TOKENS, "<pad>"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    tokenizer = TokenizersBackend(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                  pad_token="<pad>", padding_side="left")
    tokenizer.add_special_tokens({"extra_special_tokens": ["[INST]", "[/INST]", *IMAGE_TOKENS]})
    return tokenizer


def _processor(tokenizer: TokenizersBackend) -> PixtralProcessor:
    image_processor = PixtralImageProcessor(size={"longest_edge": LONGEST}, patch_size=PATCH)
    return PixtralProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH,
                            spatial_merge_size=MERGE, chat_template=MISTRAL3_CHAT_TEMPLATE)


def _config(tokenizer: TokenizersBackend) -> Mistral3Config:
    vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 head_dim=16, image_size=LONGEST, patch_size=PATCH, initializer_range=INIT_RANGE)
    text = MistralConfig(**TEXT_DIMS, **token_ids(tokenizer), head_dim=16, sliding_window=None,
                         tie_word_embeddings=False)
    return Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=MERGE,
                          image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), tie_word_embeddings=False)


MISTRAL3 = TinyFamily(_tokenizer, _processor, _config)
