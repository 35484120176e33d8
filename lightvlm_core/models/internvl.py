"""InternVL, transformers-native format (the `-hf` checkpoints): InternViT + pixel shuffle + MLP
projector + Qwen2/Llama-style LM. 1-D RoPE; each image is tiled into 448-px crops whose tokens
form one contiguous `<IMG_CONTEXT>` span between `<img>` and `</img>`."""

from lightvlm_core.models.base import ModelAdapter


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    vision_keys = ("pixel_values",)
    layer_classes = ("Qwen2DecoderLayer", "LlamaDecoderLayer")
