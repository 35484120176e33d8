"""What the engine needs from a VLM family, and the parts every family shares.

The engine runs the language model's decoder layers itself (so that it can reduce tokens
between layers and own the KV cache). An adapter hands it the pieces: the processor inputs
turned into input embeddings (image features scattered into the image-token slots), the
position ids (1-D, or Qwen2-VL's 3-row M-RoPE), the decoder layers, rotary embedding, final norm
and LM head. Families differ only in how images become features and how positions are built.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PromptInputs:
    """One request's processed prompt, on CPU until the engine moves it.

    input_ids: (T,) token ids, image placeholders already expanded by the processor.
    vision: processor tensors the vision tower needs (pixel_values, image_grid_thw, ...).
    """

    input_ids: torch.Tensor
    vision: dict[str, torch.Tensor]
    num_images: int


class ModelAdapter:
    """Generic adapter: image features from `get_image_features`, 1-D positions.

    Subclasses override `vision_kwargs` and `position_ids` where their family differs.
    """

    family: str = "generic"
    uses_mrope: bool = False
    vision_keys: tuple[str, ...] = ("pixel_values",)

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.text_model = model.model.language_model
        self.layers: nn.ModuleList = self.text_model.layers
        self.norm: nn.Module = self.text_model.norm
        self.rotary_emb: nn.Module = self.text_model.rotary_emb
        self.embed_tokens: nn.Module = self.text_model.embed_tokens
        self.lm_head: nn.Module = model.lm_head
        self.image_token_id: int = int(getattr(self.config, "image_token_id", None) or self.config.image_token_index)
        attn = self.layers[0].self_attn
        self.head_dim: int = attn.head_dim
        self.num_heads: int = self.text_config.num_attention_heads
        self.num_kv_heads: int = self.text_config.num_key_value_heads
        self.scaling: float = attn.scaling
        self.max_context: int = int(getattr(self.text_config, "max_position_embeddings", 4096))

    # --- images -> embeddings ---------------------------------------------------------------

    @torch.no_grad()
    def image_features(self, vision: dict[str, torch.Tensor]) -> torch.Tensor:
        """All image features of one prompt, in placeholder order: (N_image_tokens, d)."""
        out = self.model.model.get_image_features(**vision, return_dict=True)
        feats = out.pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)
        return feats.reshape(-1, feats.shape[-1])

    @torch.no_grad()
    def embed_batch(self, prompts: list[PromptInputs], device: torch.device, dtype: torch.dtype
                    ) -> list[torch.Tensor]:
        """Input embeddings (T_i, d) per prompt, image features in the image-token slots.

        The vision tower runs once for all images of the batch: every family's processor output
        concatenates along dim 0 (images, tiles or patches), and features come back in order.
        """
        ids = [p.input_ids.to(device) for p in prompts]
        embeds = [self.embed_tokens(i) for i in ids]
        with_images = [i for i, p in enumerate(prompts) if p.num_images]
        if not with_images:
            return embeds
        keys = [k for k in self.vision_keys if k in prompts[with_images[0]].vision]
        vision = {k: torch.cat([prompts[i].vision[k] for i in with_images]).to(device) for k in keys}
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"].to(dtype)
        feats = self.image_features(vision)
        slots = [ids[i] == self.image_token_id for i in with_images]
        counts = [int(s.sum()) for s in slots]
        if sum(counts) != feats.shape[0]:
            raise ValueError(f"{sum(counts)} image tokens but {feats.shape[0]} image features")
        for i, mask, part in zip(with_images, slots, feats.split(counts)):
            embeds[i] = embeds[i].clone()
            embeds[i][mask] = part.to(embeds[i].dtype)
        return embeds

    # --- positions --------------------------------------------------------------------------

    def position_ids(self, prompt: PromptInputs) -> tuple[torch.Tensor, int]:
        """Positions of the prompt tokens, (T,) or (3, T), and the position of the next token."""
        n = prompt.input_ids.shape[0]
        return torch.arange(n), n

    def image_spans(self, input_ids: torch.Tensor) -> list[tuple[int, int]]:
        """[start, end) of every contiguous run of image tokens (one per image or tile group)."""
        is_img = (input_ids == self.image_token_id).tolist()
        spans, start = [], None
        for i, flag in enumerate(is_img + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                spans.append((start, i))
                start = None
        return spans

    # --- rotary -----------------------------------------------------------------------------

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (B, T, head_dim) for position_ids (B, T) (1-D) or (3, B, T) (M-RoPE)."""
        return self.rotary_emb(x, position_ids)
