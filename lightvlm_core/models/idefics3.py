"""Idefics3 and SmolVLM: SigLIP tower + pixel-shuffle connector + Llama text model, which sits
under `model.text_model` (not `language_model`). Each prompt's processor output is 5-D
(1, num_tiles, 3, H, W) with a matching `pixel_attention_mask`; tiles of all the batch's prompts
are put into one row of tiles so that the vision tower runs once. 1-D positions; every tile's
image tokens are one contiguous span (tiles are separated by row/column tokens)."""

from __future__ import annotations

import torch

from lightvlm_core.models.base import ModelAdapter


class Idefics3Adapter(ModelAdapter):
    family = "idefics3"
    vision_keys = ("pixel_values", "pixel_attention_mask")
    layer_classes = ("LlamaDecoderLayer",)
    text_model_attr = "text_model"

    def stack_vision(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        # (1, n_i, ...) per prompt -> (1, sum n_i, ...): HF drops all-zero padding tiles itself
        return torch.cat([t.flatten(0, 1) for t in tensors])[None]


class SmolVLMAdapter(Idefics3Adapter):
    family = "smolvlm"
