"""LLaVA (CLIP-style vision tower + projector + Llama-style LM): 1-D RoPE, fixed image tokens."""

from lightvlm_core.models.base import ModelAdapter


class LlavaAdapter(ModelAdapter):
    family = "llava"
    vision_keys = ("pixel_values", "image_sizes")
    layer_classes = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
    fixed_size_vision_tower = "vision_tower"
