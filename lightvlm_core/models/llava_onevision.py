"""LLaVA-OneVision: SigLIP tower + MLP projector + Qwen2 text model, any-resolution tiles.

Each image is a base view plus a grid of tiles; HF unpads the grid to the image's aspect ratio and
appends an image-newline feature per row, all inside the image-token span (one contiguous span per
image). The processor pads `pixel_values` (num_images, max_tiles, 3, H, W) per prompt, so prompts
with different tile counts are padded again to the batch's largest; HF slices each image's real
tiles back out using `image_sizes`; as in HF, images of a multi-image prompt get only their base
view (`batch_num_images`). 1-D positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightvlm_core.models.base import ModelAdapter


class LlavaOnevisionAdapter(ModelAdapter):
    family = "llava_onevision"
    # batch_num_images: a prompt with several images gets only their base views (no tiles)
    vision_keys = ("pixel_values", "image_sizes", "batch_num_images")
    layer_classes = ("Qwen2DecoderLayer",)

    def stack_vision(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if tensors[0].dim() != 5:  # image_sizes (num_images, 2), batch_num_images (1,) per prompt
            return torch.cat(tensors)
        tiles = max(t.shape[1] for t in tensors)
        return torch.cat([F.pad(t, (0, 0, 0, 0, 0, 0, 0, tiles - t.shape[1])) for t in tensors])
