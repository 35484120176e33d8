"""What every tiny family shares: the byte-level BPE tokenizer recipe, ChatML templates, the
token-id fields of a text config, shared tiny text-decoder dims, and model init/saving.

Every family trains the same byte-level BPE (Qwen2 pre-tokenizer) in a few ms on the small English
corpus below, so any unicode text round-trips, then adds the family's real special tokens. Text
models have hidden size 64, 6 decoder layers and GQA (4 query heads, 2 KV heads); vision towers
have 2 layers. Weights use a large initializer_range so greedy decoding is far from ties.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    AutoModelForImageTextToText,
    GenerationConfig,
    PreTrainedConfig,
    ProcessorMixin,
    Qwen2Tokenizer,
    TokenizersBackend,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

BPE_VOCAB_SIZE = 800  # byte alphabet (256) + merges; special tokens come on top
INIT_RANGE = 0.2  # large on purpose: decisive random logits, no greedy near-ties

# Shared tiny text-decoder dims (GQA: 4 query heads, 2 KV heads, head_dim 16).
TEXT_DIMS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    initializer_range=INIT_RANGE,
)


QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

_CORPUS = """\
A small red car is parked in front of a white house. The sky is blue and there are a few clouds.
Two children are playing with a ball on the green grass near the old tree.
The picture shows a cat sitting on a wooden table next to a cup of coffee.
What is in this image? Describe the scene in one sentence, please.
There is a man riding a bicycle down a busy street in the city at night.
The woman holds an umbrella because it is raining, and the road is wet and shiny.
A plate of food with rice, vegetables and a piece of chicken is on the kitchen counter.
The dog is running across the beach while the waves roll onto the sand.
How many people are in the photo? I can see three people standing by the window.
The train arrives at the station in the morning, and many passengers step onto the platform.
On the left side there is a tall building made of glass; on the right side there is a small park.
The answer is yes. The answer is no. It looks like a bird flying over the mountains.
Please answer the question about the chart: the blue bar is higher than the orange bar.
The text on the sign says "Welcome", and the letters are large, bold and yellow.
She opened the book and began to read the first chapter aloud to her friends.
The weather today is warm and sunny, with a light wind from the west.
A group of students is sitting in a classroom, listening to the teacher explain the lesson.
The boat is floating on a calm lake surrounded by pine trees and hills.
He is wearing a black jacket, blue jeans and white shoes, and he is smiling at the camera.
The numbers 1, 2, 3, 10, 42 and 2024 appear at the bottom of the page.
Assistant: Sure! Here is a short description of the image. User: Thank you, that was helpful.
The quick brown fox jumps over the lazy dog, and then it runs back into the forest.
In the center of the room there is a large sofa with colorful pillows and a soft blanket.
The market is full of fresh fruit: apples, oranges, bananas, grapes and strawberries.
An airplane is taking off from the airport runway under a bright orange sunset.
"""


@dataclass(frozen=True)
class TinyFamily:
    """How to build one family: its tokenizer, the processor around it, and the model config."""

    tokenizer: Callable[[], TokenizersBackend]
    processor: Callable[[TokenizersBackend], ProcessorMixin]
    config: Callable[[TokenizersBackend], PreTrainedConfig]


def train_byte_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with Qwen2's pre-tokenizer; return (vocab, merges)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def byte_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def with_specials(vocab: dict[str, int], specials: list[str]) -> dict[str, int]:
    """Append special tokens after the BPE vocab, in order (as in the real checkpoints)."""
    vocab = dict(vocab)
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


def qwen_tokenizer(extra_named: dict[str, str], extra: list[str]) -> Qwen2Tokenizer:
    vocab, merges = train_byte_bpe()
    specials = QWEN_SPECIALS + QWEN_VISION_SPECIALS + list(extra_named.values()) + extra
    tokenizer = Qwen2Tokenizer(
        vocab=with_specials(vocab, specials),
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra_named or None,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"extra_special_tokens": [t for t in specials if t not in extra_named.values()]})
    return tokenizer



def chatml_template(image: str, video: str, default_system: str | None) -> str:
    """ChatML template (Qwen/InternVL style); `image`/`video` are what a media part renders to."""
    system = (
        "{%- if messages[0]['role'] != 'system' -%}"
        f"{{{{ '<|im_start|>system\\n{default_system}<|im_end|>\\n' }}}}"
        "{%- endif -%}"
        if default_system
        else ""
    )
    return (
        system + "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' or 'image' in part or 'image_url' in part -%}"
        f"{{{{ {image!r} }}}}"
        "{%- elif part['type'] == 'video' or 'video' in part -%}"
        f"{{{{ {video!r} }}}}"
        "{%- elif 'text' in part -%}{{ part['text'] }}"
        "{%- endif -%}{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
    )



def token_ids(tokenizer: TokenizersBackend) -> dict[str, int | None]:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )



def init_model(config: PreTrainedConfig, seed: int) -> torch.nn.Module:
    config.initializer_range = INIT_RANGE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    return model.eval()


def generation_config(tokenizer: TokenizersBackend) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )

