"""Tiny Idefics3 and SmolVLM: SigLIP-style vision tower, pixel-shuffle connector (scale 2: 64
patches -> 16 image tokens per 56 px tile), Llama text model under `model.text_model` (not
`language_model`). Images are resized to a 112 px longest edge and split into a grid of up to 2x2
tiles plus a global view, each wrapped in <fake_token_around_image><row_i_col_j> / <global-img>
tokens: 16 image tokens per tile, 48 or 80 per image (by aspect ratio)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import (
    Idefics3Config,
    Idefics3ImageProcessor,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMImageProcessor,
    SmolVLMProcessor,
    SmolVLMVideoProcessor,
    SmolVLMVisionConfig,
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

TILE, PATCH, SCALE = 56, 7, 2
TOKENS_PER_TILE = (TILE // PATCH) ** 2 // SCALE**2
GRID_TOKENS = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
IDEFICS_NAMED = {"fake_image_token": "<fake_token_around_image>", "image_token": "<image>",
                 "end_of_utterance_token": "<end_of_utterance>", "global_image_token": "<global-img>"}

# "User:<image>question<end_of_utterance>\nAssistant:" (images first, as in the real templates)
IDEFICS_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{{ message['role'] | capitalize }}"
    "{%- if message['content'] is string -%}{{ ': ' + message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ ':<image>' if loop.first else '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ (': ' if loop.first else '') + part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def _tokenizer() -> TokenizersBackend:
    """SmolLM-style specials on a byte-level BPE, plus the image layout tokens."""
    vocab, merges = train_byte_bpe()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, **{t: i + 3 for t, i in vocab.items()}}
    vocab = with_specials(vocab, [*IDEFICS_NAMED.values(), *GRID_TOKENS, "<video>"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tokenizer = TokenizersBackend(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens=IDEFICS_NAMED,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"extra_special_tokens": [*GRID_TOKENS, "<video>", "<|im_end|>"]})
    return tokenizer


def _image_processor_kwargs() -> dict:
    return dict(size={"longest_edge": 2 * TILE}, max_image_size={"longest_edge": TILE}, do_image_splitting=True)


def _idefics3_processor(tokenizer: TokenizersBackend) -> Idefics3Processor:
    return Idefics3Processor(image_processor=Idefics3ImageProcessor(**_image_processor_kwargs()), tokenizer=tokenizer,
                             image_seq_len=TOKENS_PER_TILE, chat_template=IDEFICS_CHAT_TEMPLATE)


def _smolvlm_processor(tokenizer: TokenizersBackend) -> SmolVLMProcessor:
    return SmolVLMProcessor(image_processor=SmolVLMImageProcessor(**_image_processor_kwargs()), tokenizer=tokenizer,
                            video_processor=SmolVLMVideoProcessor(), image_seq_len=TOKENS_PER_TILE,
                            chat_template=IDEFICS_CHAT_TEMPLATE)


def _parts(tokenizer: TokenizersBackend, vision_cls) -> dict:
    vision = vision_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                        image_size=TILE, patch_size=PATCH, initializer_range=INIT_RANGE)
    text = LlamaConfig(**TEXT_DIMS, **token_ids(tokenizer), tie_word_embeddings=False)
    return dict(vision_config=vision, text_config=text, scale_factor=SCALE, tie_word_embeddings=False,
                image_token_id=tokenizer.convert_tokens_to_ids("<image>"))


def _idefics3_config(tokenizer: TokenizersBackend) -> Idefics3Config:
    return Idefics3Config(**_parts(tokenizer, Idefics3VisionConfig))


def _smolvlm_config(tokenizer: TokenizersBackend) -> SmolVLMConfig:
    return SmolVLMConfig(**_parts(tokenizer, SmolVLMVisionConfig))


IDEFICS3 = TinyFamily(_tokenizer, _idefics3_processor, _idefics3_config)
SMOLVLM = TinyFamily(_tokenizer, _smolvlm_processor, _smolvlm_config)
