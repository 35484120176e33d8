"""Tiny Gemma 3: SigLIP vision tower + average-pooling projector (64 patches -> 16 image tokens
per 56 px image, any input size), Gemma 3 text decoder with its four norms per layer, q/k norms,
5 sliding-window layers (window 16, local RoPE base) per global layer, and bidirectional
attention among the tokens of one image in prefill. Gemma-style tokens and chat template."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import (
    Gemma3Config,
    Gemma3ImageProcessor,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
    TokenizersBackend,
)

from lightvlm_core.tiny.common import (
    INIT_RANGE,
    TEXT_DIMS,
    TinyFamily,
    byte_pre_tokenizer,
    train_byte_bpe,
    with_specials,
)

GEMMA_IMAGE_SIZE, GEMMA_PATCH, GEMMA_IMAGE_TOKENS = 56, 7, 16
GEMMA_WINDOW = 16  # small, so that test prompts cross it
GEMMA_NAMED = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _tokenizer() -> TokenizersBackend:
    """Gemma's special tokens (<pad>, <eos>, <bos>, <unk> first; turn and image tokens last)."""
    vocab, merges = train_byte_bpe()
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, **{t: i + 4 for t, i in vocab.items()}}
    vocab = with_specials(vocab, ["<start_of_turn>", "<end_of_turn>", *GEMMA_NAMED.values()])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    tokenizer = TokenizersBackend(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<end_of_turn>",  # what ends a chat answer (the real generation_config lists it too)
        pad_token="<pad>",
        extra_special_tokens=GEMMA_NAMED,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"extra_special_tokens": ["<eos>", "<start_of_turn>"]})
    return tokenizer


def _processor(tokenizer: TokenizersBackend) -> Gemma3Processor:
    image_processor = Gemma3ImageProcessor(size={"height": GEMMA_IMAGE_SIZE, "width": GEMMA_IMAGE_SIZE},
                                           do_pan_and_scan=False)
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                           chat_template=GEMMA_CHAT_TEMPLATE, image_seq_length=GEMMA_IMAGE_TOKENS)


def _config(tokenizer: TokenizersBackend) -> Gemma3Config:
    ids = tokenizer.convert_tokens_to_ids
    text = Gemma3TextConfig(
        **TEXT_DIMS,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=GEMMA_WINDOW,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
                         "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0}},
    )
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=GEMMA_IMAGE_SIZE,
        patch_size=GEMMA_PATCH,
        initializer_range=INIT_RANGE,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=GEMMA_IMAGE_TOKENS,
        boi_token_index=ids(GEMMA_NAMED["boi_token"]),
        eoi_token_index=ids(GEMMA_NAMED["eoi_token"]),
        image_token_index=ids(GEMMA_NAMED["image_token"]),
        tie_word_embeddings=False,  # tied, the sqrt(d)-scaled random embeddings make it echo its input
    )


GEMMA3 = TinyFamily(_tokenizer, _processor, _config)
