"""Gemma 3: SigLIP tower + average-pooling projector, and a text decoder that differs from Llama in
four ways the forward pass takes from here:

- "sandwich" norms: the attention and MLP outputs are normed before their residual add, and the
  MLP input has its own pre-feedforward norm;
- sliding-window layers (`layer_types`, window `sliding_window`) between global ones, each kind
  with its own rotary table (local / global RoPE base);
- in prefill, the tokens of one image attend to each other bidirectionally (HF's blockwise mask
  over contiguous image-token runs, which are exactly our image spans);
- scaling by `query_pre_attn_scalar` and the sqrt(d)-scaled embedding (both inside the modules).
Positions are 1-D. Logit soft-capping is refused at load (models/check.py).
"""

from __future__ import annotations

import torch
from torch import nn

from lightvlm_core.fusion import mlp
from lightvlm_core.models.base import LayerSpec, ModelAdapter


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    layer_classes = ("Gemma3DecoderLayer",)
    norm_layout = "sandwich"
    bidirectional_images = True
    supports_sliding_window = True
    fixed_size_vision_tower = "vision_tower"

    def _layer_specs(self) -> list[LayerSpec]:
        # each layer kind has its own rotary table, named like the layer type
        window = self.text_config.sliding_window
        return [LayerSpec("sliding", window, kind) if kind == "sliding_attention" else LayerSpec(rope=kind)
                for kind in self.text_config.layer_types]

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor, rope: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary_emb(x, position_ids, rope or "full_attention")

    def attn_residual(self, layer: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        return h + layer.post_attention_layernorm(attn_out)

    def mlp_residual(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        return h + layer.post_feedforward_layernorm(mlp(layer.mlp, layer.pre_feedforward_layernorm(h)))
