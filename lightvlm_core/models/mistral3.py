"""Mistral 3 (Mistral-Small-3.1 style): Pixtral vision tower (native aspect ratio, 2-D RoPE) +
2x2 patch-merger projector + Mistral text model. Each image is rows of [IMG] tokens separated by
[IMG_BREAK], so every row is its own image span. Each prompt's processor pads its images to one
(H, W); prompts are padded again to the batch's largest and Pixtral crops each image back with
`image_sizes`. 1-D positions; Mistral's `sliding_window` (every layer, when set) is implemented.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightvlm_core.models.base import ModelAdapter


class Mistral3Adapter(ModelAdapter):
    family = "mistral3"
    vision_keys = ("pixel_values", "image_sizes")
    layer_classes = ("MistralDecoderLayer",)
    supports_sliding_window = True

    def stack_vision(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if tensors[0].dim() != 4:  # image_sizes (num_images, 2)
            return torch.cat(tensors)
        h, w = max(t.shape[2] for t in tensors), max(t.shape[3] for t in tensors)
        return torch.cat([F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2])) for t in tensors])
