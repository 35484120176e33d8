"""Random-init tiny models of real VLM architectures, with working processors.

`make_tiny(family, out_dir, seed)` writes a Hugging Face model directory that loads fully offline
with `AutoProcessor.from_pretrained` and `AutoModelForImageTextToText.from_pretrained`:

- `llava`: `LlavaForConditionalGeneration` (CLIP vision + Llama text), `LlavaProcessor`,
  56x56 images with patch 7 -> 64 image tokens.
- `qwen2_vl`: `Qwen2VLForConditionalGeneration` (3-row M-RoPE), `Qwen2VLProcessor` with small
  min/max_pixels, so the image-token count follows the input size (4..64 tokens).
- `qwen2_5_vl`: `Qwen2_5_VLForConditionalGeneration` (windowed vision attention), same processor setup.
- `internvl`: the transformers-native `InternVLForConditionalGeneration` (`-hf` checkpoint format,
  Qwen2 text model), `InternVLProcessor` with 56px tiles, crop_to_patches and pixel shuffle ->
  16 image tokens per tile, 1..7 tiles per image.

Every family shares one tokenizer recipe: a byte-level BPE (Qwen2 pre-tokenizer) trained in a few ms
on the small English corpus below, so any unicode text round-trips, plus the family's real special
tokens and a chat template close to the real one. Text models have hidden size 64, 6 decoder
layers and GQA (4 query heads, 2 KV heads); vision towers have 2 layers. Weights use a large
initializer_range so greedy decoding is far from ties. Everything is deterministic in `seed`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForImageTextToText,
    CLIPVisionConfig,
    GenerationConfig,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaImageProcessor,
    LlavaProcessor,
    PreTrainedConfig,
    ProcessorMixin,
    Qwen2_5_VLConfig,
    Qwen2_5_VLProcessor,
    Qwen2Config,
    Qwen2Tokenizer,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    TokenizersBackend,
)
from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "internvl")

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

# Qwen2-VL / 2.5-VL image geometry: 28px per merged token, 4..64 image tokens per image.
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = QWEN_FACTOR * QWEN_FACTOR * 4
QWEN_MAX_PIXELS = QWEN_FACTOR * QWEN_FACTOR * 64

# LLaVA: 56x56 images, patch 7 -> 8x8 = 64 patch tokens (the CLS token is dropped).
LLAVA_IMAGE_SIZE, LLAVA_PATCH = 56, 7

# InternVL: 56px tiles, patch 7 -> 8x8 patches -> pixel shuffle 0.5 -> 16 tokens per tile.
INTERNVL_TILE, INTERNVL_PATCH, INTERNVL_MAX_TILES = 56, 7, 6
INTERNVL_TOKENS_PER_TILE = (INTERNVL_TILE // INTERNVL_PATCH) ** 2 // 4

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VISION_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
INTERNVL_NAMED = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
INTERNVL_OTHER = ["<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]

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


def make_tiny(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a random-init tiny `family` model plus its processor into `out_dir` and return it.

    The directory holds float32 safetensors weights, config.json, generation_config.json (eos/pad
    equal to the tokenizer's) and the processor files (tokenizer, image/video processor, chat template).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _TOKENIZER_BUILDERS[family]()
    processor = _PROCESSOR_BUILDERS[family](tokenizer)
    config = _CONFIG_BUILDERS[family](tokenizer)
    model = _init_model(config, seed)
    model.generation_config = _generation_config(tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# ---------------------------------------------------------------- tokenizers


def _train_byte_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Train a byte-level BPE with Qwen2's pre-tokenizer; return (vocab, merges)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _byte_pre_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer)
    model = json.loads(tok.to_str())["model"]
    return model["vocab"], [tuple(m) for m in model["merges"]]


def _byte_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    split = pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _with_specials(vocab: dict[str, int], specials: list[str]) -> dict[str, int]:
    """Append special tokens after the BPE vocab, in order (as in the real checkpoints)."""
    vocab = dict(vocab)
    for token in specials:
        vocab[token] = len(vocab)
    return vocab


def _qwen_tokenizer(extra_named: dict[str, str], extra: list[str]) -> Qwen2Tokenizer:
    vocab, merges = _train_byte_bpe()
    specials = QWEN_SPECIALS + QWEN_VISION_SPECIALS + list(extra_named.values()) + extra
    tokenizer = Qwen2Tokenizer(
        vocab=_with_specials(vocab, specials),
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=extra_named or None,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"extra_special_tokens": [t for t in specials if t not in extra_named.values()]})
    return tokenizer


def _qwen_vl_tokenizer() -> Qwen2Tokenizer:
    return _qwen_tokenizer({}, [])


def _internvl_tokenizer() -> Qwen2Tokenizer:
    return _qwen_tokenizer(INTERNVL_NAMED, INTERNVL_OTHER)


def _llava_tokenizer() -> TokenizersBackend:
    """Llama-style special tokens (<unk>, <s>, </s> first; <image>, <pad> last) on a byte-level BPE."""
    vocab, merges = _train_byte_bpe()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: i + 3 for t, i in vocab.items()}}
    vocab = _with_specials(vocab, ["<image>", "<pad>"])
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _byte_pre_tokenizer()
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


# ---------------------------------------------------------------- chat templates

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


def _chatml_template(image: str, video: str, default_system: str | None) -> str:
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


QWEN_CHAT_TEMPLATE = _chatml_template(
    "<|vision_start|><|image_pad|><|vision_end|>",
    "<|vision_start|><|video_pad|><|vision_end|>",
    default_system="You are a helpful assistant.",
)
INTERNVL_CHAT_TEMPLATE = _chatml_template("<IMG_CONTEXT>\n", "<video>\n", default_system=None)


# ---------------------------------------------------------------- processors


def _llava_processor(tokenizer: TokenizersBackend) -> LlavaProcessor:
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


def _qwen_processor(cls: type[ProcessorMixin]) -> Callable[[Qwen2Tokenizer], ProcessorMixin]:
    def build(tokenizer: Qwen2Tokenizer) -> ProcessorMixin:
        pixels = dict(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
        return cls(
            image_processor=Qwen2VLImageProcessor(**pixels),
            tokenizer=tokenizer,
            video_processor=Qwen2VLVideoProcessor(**pixels),
            chat_template=QWEN_CHAT_TEMPLATE,
        )

    return build


def _internvl_processor(tokenizer: Qwen2Tokenizer) -> InternVLProcessor:
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


# ---------------------------------------------------------------- model configs


def _token_ids(tokenizer: TokenizersBackend) -> dict[str, int | None]:
    return dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _llava_config(tokenizer: TokenizersBackend) -> LlavaConfig:
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
    text = LlamaConfig(**TEXT_DIMS, **_token_ids(tokenizer))
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(LLAVA_IMAGE_SIZE // LLAVA_PATCH) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _qwen_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen_text(tokenizer: Qwen2Tokenizer) -> dict:
    # head_dim 16 -> 8 rotary frequencies split over (temporal, height, width).
    rope = {"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [2, 3, 3]}
    return dict(**TEXT_DIMS, **_token_ids(tokenizer), rope_parameters=rope)


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
    return Qwen2VLConfig(text_config=_qwen_text(tokenizer), vision_config=vision, **_qwen_ids(tokenizer))


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
    return Qwen2_5_VLConfig(text_config=_qwen_text(tokenizer), vision_config=vision, **_qwen_ids(tokenizer))


def _internvl_config(tokenizer: Qwen2Tokenizer) -> InternVLConfig:
    vision = InternVLVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=INTERNVL_TILE,
        patch_size=INTERNVL_PATCH,
        initializer_range=INIT_RANGE,
    )
    text = Qwen2Config(**TEXT_DIMS, **_token_ids(tokenizer), tie_word_embeddings=False)
    return InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.context_image_token_id,
        image_seq_length=INTERNVL_TOKENS_PER_TILE,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------- model


def _init_model(config: PreTrainedConfig, seed: int) -> torch.nn.Module:
    config.initializer_range = INIT_RANGE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    return model.eval()


def _generation_config(tokenizer: TokenizersBackend) -> GenerationConfig:
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


_TOKENIZER_BUILDERS: dict[str, Callable[[], TokenizersBackend]] = {
    "llava": _llava_tokenizer,
    "qwen2_vl": _qwen_vl_tokenizer,
    "qwen2_5_vl": _qwen_vl_tokenizer,
    "internvl": _internvl_tokenizer,
}
_PROCESSOR_BUILDERS: dict[str, Callable[[TokenizersBackend], ProcessorMixin]] = {
    "llava": _llava_processor,
    "qwen2_vl": _qwen_processor(Qwen2VLProcessor),
    "qwen2_5_vl": _qwen_processor(Qwen2_5_VLProcessor),
    "internvl": _internvl_processor,
}
_CONFIG_BUILDERS: dict[str, Callable[[TokenizersBackend], PreTrainedConfig]] = {
    "llava": _llava_config,
    "qwen2_vl": _qwen2_vl_config,
    "qwen2_5_vl": _qwen2_5_vl_config,
    "internvl": _internvl_config,
}
