"""Benchmark profiles: random-weight models with the shapes of real deployments.

Speed depends on shapes, not on trained weights, so each profile builds a model of a real
architecture with random weights in memory (nothing to download) plus a working processor, and
a workload (image size, prompt). Shapes and FLOP split are documented per profile; `describe()`
computes the split so the README can quote it.

- `cpu-small`: InternVL-architecture, LLM at full InternLM2.5-7B depth (32 layers, GQA 4:1,
  MLP 3.5x) but 256 wide; vision tower sized so it takes ~12% of prefill FLOPs, as
  InternViT-300M does in InternVL2.5-8B; 224-px tiles with the real 4:1 patch-to-token pixel
  shuffle, a 896x672 image -> 12 tiles + thumbnail = 832 image tokens. Runs on 2 CPU cores.
- `ci-tiny`: a few-second smoke test of the machinery, not a performance profile.
- `gpu-8b`: InternVL2.5-8B shapes (InternViT-300M + InternLM2.5-7B-sized Llama decoder), bf16.
- `gpu-26b`: InternVL2.5-26B shapes (InternViT-6B + InternLM2.5-20B-sized decoder), bf16.
- `qwen2vl-7b`: Qwen2-VL-7B shapes, bf16.
- `qwen3vl-8b`: Qwen3-VL-8B shapes (36-layer Qwen3 decoder, 27-layer ViT with DeepStack from
  vision layers 8/16/24), bf16.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from PIL import Image, ImageDraw
from transformers import (
    AutoModelForImageTextToText,
    GotOcr2ImageProcessor,
    InternVLConfig,
    InternVLProcessor,
    InternVLVideoProcessor,
    InternVLVisionConfig,
    LlamaConfig,
    Qwen2VLConfig,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
    Qwen3VLConfig,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from lightvlm_core.loading import LoadedModel, resolve_device, resolve_dtype
from lightvlm_core.models import adapter_for
from lightvlm_core.tiny import common, internvl, qwen_vl
from lightvlm_core.tiny.qwen3_vl import QWEN3_CHAT_TEMPLATE


@dataclass(frozen=True)
class Profile:
    name: str
    family: str  # "internvl" | "qwen2_vl" | "qwen3_vl"
    text: dict  # decoder dims
    vision: dict  # vision tower dims
    tile: int  # InternVL tile size (px) / unused for Qwen
    patch: int
    max_tiles: int
    image_size: tuple[int, int]  # (w, h) of the benchmark image
    device: str = "auto"
    dtype: str = "auto"
    prefill_runs: int = 5
    decode_lengths: tuple[int, ...] = (256,)  # long-generation lengths (batch 1)
    decode_batches: tuple[int, ...] = (1, 4, 16)
    decode_tokens: int = 128  # tokens per row in the throughput runs
    decode_repeats: int = 1  # interleaved repetitions of every decode case (medians reported)
    kv_budget: int = 128
    notes: str = ""
    extra: dict = field(default_factory=dict)


INTERNLM_7B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8)
INTERNLM_20B = dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=48, num_attention_heads=48,
                    num_key_value_heads=8)
INTERNVIT_300M = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
INTERNVIT_6B = dict(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25)

PROFILES: dict[str, Profile] = {
    p.name: p
    for p in [
        Profile(
            name="cpu-small", family="internvl",
            text=dict(hidden_size=256, intermediate_size=896, num_hidden_layers=32, num_attention_heads=8,
                      num_key_value_heads=2),
            vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=6, num_attention_heads=4),
            tile=224, patch=14, max_tiles=12, image_size=(896, 672), device="cpu", dtype="float32",
            prefill_runs=7, decode_lengths=(512,), decode_batches=(1, 4, 16), decode_tokens=128, kv_budget=256,
            decode_repeats=2,
            notes="InternVL2.5-8B proportions scaled to 2 CPU cores",
        ),
        Profile(
            name="ci-tiny", family="internvl",
            text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=2),
            vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
            tile=56, patch=7, max_tiles=2, image_size=(112, 56), device="cpu", dtype="float32",
            prefill_runs=2, decode_lengths=(24,), decode_batches=(1, 2), decode_tokens=24, kv_budget=24,
            notes="smoke test of the benchmark machinery (seconds); not a performance profile",
        ),
        Profile(
            name="gpu-8b", family="internvl", text=INTERNLM_7B, vision=INTERNVIT_300M,
            tile=448, patch=14, max_tiles=12, image_size=(1792, 1344), device="cuda", dtype="bfloat16",
            decode_lengths=(1024, 4096), decode_batches=(1, 8, 32), decode_tokens=512, kv_budget=1024,
            notes="InternVL2.5-8B shapes, random bf16 weights",
        ),
        Profile(
            name="gpu-26b", family="internvl", text=INTERNLM_20B, vision=INTERNVIT_6B,
            tile=448, patch=14, max_tiles=12, image_size=(1792, 1344), device="cuda", dtype="bfloat16",
            decode_lengths=(1024,), decode_batches=(1, 8), decode_tokens=512, kv_budget=1024,
            notes="InternVL2.5-26B shapes, random bf16 weights",
        ),
        Profile(
            name="qwen2vl-7b", family="qwen2_vl",
            text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                      num_key_value_heads=4),
            vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4),
            tile=0, patch=14, max_tiles=0, image_size=(1344, 1008), device="cuda", dtype="bfloat16",
            decode_lengths=(1024,), decode_batches=(1, 8, 32), decode_tokens=512, kv_budget=1024,
            notes="Qwen2-VL-7B shapes, random bf16 weights",
        ),
        Profile(
            name="qwen3vl-8b", family="qwen3_vl",
            text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128),
            vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                        num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24]),
            tile=0, patch=16, max_tiles=0, image_size=(1344, 1008), device="cuda", dtype="bfloat16",
            decode_lengths=(1024,), decode_batches=(1, 8, 32), decode_tokens=512, kv_budget=1024,
            notes="Qwen3-VL-8B shapes, random bf16 weights",
        ),
    ]
}


def build(profile: Profile) -> LoadedModel:
    """Random-weight model + processor for `profile`, on its device and dtype."""
    device = resolve_device(profile.device)
    dtype = resolve_dtype(profile.dtype, device)
    tokenizer, (processor, config) = processor_and_config(profile)
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.generation_config = common.generation_config(tokenizer)
    model.eval()
    return LoadedModel(profile.name, model, processor, adapter_for(model), device, dtype)


def processor_and_config(profile: Profile):
    """(tokenizer, (processor, model config)) of a profile; the config can be built on the meta device."""
    if profile.family == "internvl":
        tokenizer = internvl.internvl_tokenizer()
        return tokenizer, _internvl(profile, tokenizer)
    tokenizer = qwen_vl.qwen_vl_tokenizer()
    return tokenizer, (_qwen3_vl if profile.family == "qwen3_vl" else _qwen2_vl)(profile, tokenizer)


def _text_config(profile: Profile, tokenizer) -> LlamaConfig:
    return LlamaConfig(**profile.text, max_position_embeddings=32768, **common.token_ids(tokenizer),
                       tie_word_embeddings=False)


def _internvl(profile: Profile, tokenizer):
    tile = {"height": profile.tile, "width": profile.tile}
    tokens_per_tile = (profile.tile // profile.patch) ** 2 // 4  # pixel shuffle 0.5
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, min_patches=1,
                                              max_patches=profile.max_tiles),
        tokenizer=tokenizer, video_processor=InternVLVideoProcessor(size=tile),
        image_seq_length=tokens_per_tile, chat_template=internvl.INTERNVL_CHAT_TEMPLATE,
    )
    vision = InternVLVisionConfig(**profile.vision, image_size=profile.tile, patch_size=profile.patch)
    config = InternVLConfig(vision_config=vision, text_config=_text_config(profile, tokenizer),
                            image_token_id=tokenizer.context_image_token_id, image_seq_length=tokens_per_tile,
                            downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)
    return processor, config


def _qwen2_vl(profile: Profile, tokenizer):
    w, h = profile.image_size
    image_processor = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=w * h)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=qwen_vl.QWEN_CHAT_TEMPLATE)
    text = dict(profile.text, max_position_embeddings=32768, rope_parameters={
        "rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    config = Qwen2VLConfig(text_config=dict(text, **common.token_ids(tokenizer)),
                           vision_config=dict(profile.vision, patch_size=profile.patch),
                           image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
                           video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
                           vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    return processor, config


def _qwen3_vl(profile: Profile, tokenizer):
    w, h = profile.image_size
    size = {"shortest_edge": 64 * 64, "longest_edge": w * h}
    kw = dict(size=size, patch_size=profile.patch, merge_size=2)
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                                 video_processor=Qwen3VLVideoProcessor(**kw), chat_template=QWEN3_CHAT_TEMPLATE)
    rope = {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    text = dict(profile.text, max_position_embeddings=32768, rope_parameters=rope, **common.token_ids(tokenizer))
    config = Qwen3VLConfig(text_config=text, vision_config=dict(profile.vision, patch_size=profile.patch),
                           tie_word_embeddings=False, **qwen_vl.qwen_ids(tokenizer))
    return processor, config


def bench_image(profile: Profile) -> Image.Image:
    """A synthetic scene at the profile's image size (content does not matter for speed)."""
    w, h = profile.image_size
    img = Image.new("RGB", (w, h), (235, 235, 235))
    draw = ImageDraw.Draw(img)
    for i in range(12):
        x, y = (i * 173) % (w - w // 6), (i * 97) % (h - h // 6)
        draw.ellipse((x, y, x + w // 7, y + h // 7), fill=((i * 60) % 255, (i * 110) % 255, (i * 35) % 255))
    return img


def describe(loaded: LoadedModel, num_image_tokens: int, num_text_tokens: int, num_vision_tokens: int) -> dict:
    """Parameter counts and the prefill FLOP split (2 FLOPs per parameter per token, plus attention)."""
    model = loaded.model
    vision_params = sum(p.numel() for n, p in model.named_parameters() if "vision" in n or "visual" in n)
    text = loaded.adapter.text_config
    per_layer = sum(p.numel() for p in loaded.adapter.layers[0].parameters())
    n_llm = num_image_tokens + num_text_tokens
    layers = text.num_hidden_layers
    llm_flops = 2 * per_layer * layers * n_llm + 4 * layers * n_llm**2 * text.hidden_size  # + QK^T and AV
    vision_flops = 2 * vision_params * num_vision_tokens
    return {
        "vision_params_m": round(vision_params / 1e6, 2),
        "llm_layer_params_m": round(per_layer / 1e6, 3),
        "llm_layers": text.num_hidden_layers,
        "image_tokens": num_image_tokens,
        "text_tokens": num_text_tokens,
        "vision_flops_share": round(vision_flops / (vision_flops + llm_flops), 3),
    }
