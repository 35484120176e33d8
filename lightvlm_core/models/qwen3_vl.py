"""Qwen3-VL: Qwen3 text decoder (per-head q/k norms), interleaved 3-row M-RoPE, and DeepStack:
features taken from several vision-tower layers are added to the image tokens' hidden states
after each of the first LLM layers (one feature set per layer).

The DeepStack features travel as per-token `carry` (B, T, num_deepstack, d), zero on text, so
token reduction gathers (and merging averages) them with the tokens they belong to.
"""

from __future__ import annotations

import torch

from lightvlm_core.models.qwen2_vl import Qwen2VLAdapter

DEEPSTACK = "deepstack"


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    layer_classes = ("Qwen3VLTextDecoderLayer",)

    @torch.no_grad()
    def image_features_with_carry(self, vision: dict[str, torch.Tensor]
                                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model.model.get_image_features(**vision, return_dict=True)
        feats = torch.cat(out.pooler_output, dim=0)  # (N, d)
        per_layer = [torch.cat(f, dim=0) for f in out.deepstack_features]  # each (N, d)
        return feats, {DEEPSTACK: torch.stack(per_layer, dim=1)}  # (N, num_deepstack, d)

    def inject(self, layer: int, h: torch.Tensor, carry: dict[str, torch.Tensor]) -> torch.Tensor:
        deepstack = carry.get(DEEPSTACK)
        if deepstack is None or layer >= deepstack.shape[2]:
            return h
        # zero rows on text tokens, so adding everywhere equals HF's masked add on image tokens
        return h + deepstack[:, :, layer].to(h.dtype)
