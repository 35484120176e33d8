"""Qwen2-VL and Qwen2.5-VL: dynamic-resolution vision tower with 2x2 patch merging and 3-row
M-RoPE positions (temporal, height, width) for image tokens. Text after an image continues from
the largest position used so far, so the next position is `max + 1` rather than the token count
(the difference is the model's `rope_deltas`)."""

from __future__ import annotations

import torch

from lightvlm_core.models.base import ModelAdapter, PromptInputs


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    uses_mrope = True
    vision_keys = ("pixel_values", "image_grid_thw")
    layer_classes = ("Qwen2VLDecoderLayer",)

    def position_ids(self, prompt: PromptInputs) -> tuple[torch.Tensor, int]:
        ids = prompt.input_ids
        if not prompt.num_images:
            pos = torch.arange(ids.shape[0]).expand(3, -1)
            return pos, ids.shape[0]
        token_types = prompt.vision.get("mm_token_type_ids")
        if token_types is None:
            token_types = (ids == self.image_token_id).int()
        pos, deltas = self.model.model.get_rope_index(
            ids[None],
            mm_token_type_ids=token_types.reshape(1, -1),
            image_grid_thw=prompt.vision["image_grid_thw"],
        )
        return pos[:, 0], int(ids.shape[0] + deltas.reshape(-1)[0])


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    layer_classes = ("Qwen2_5_VLDecoderLayer",)
