"""What the engine needs from a VLM family (the adapter contract), and the parts every family shares.

The engine runs the language model's decoder layers itself (so that it can reduce tokens
between layers and own the KV cache). An adapter hands it:

- images into the prompt: `embed_batch` -> input embeddings with image features in the
  image-token slots, plus per-token `carry` features (e.g. Qwen3-VL's DeepStack) that follow
  their token through reduction;
- `image_spans`: [start, end) of each contiguous image-token run;
- `position_ids`: 1-D, or 3-row M-RoPE (`uses_mrope`), and the next position;
- the decoder parts the forward pass uses: `embed_tokens`, `layers` (each with `self_attn`
  q/k/v/o projections and optional q/k norms, `mlp`, the norms of `norm_layout`), `rotary`,
  `norm`, `lm_head`, `scaling`;
- per layer, a `LayerSpec`: global or sliding-window attention (and its window) and which
  rotary table it uses; `bidirectional_images` for image tokens that see their whole image;
- `inject(layer, state)`: additions to the hidden states after a layer (DeepStack).

`check_supported` (models/check.py) refuses, at load, any model whose layers or config use
something outside this contract, so an unsupported model fails instead of giving wrong output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lightvlm_core.fusion import mlp
from lightvlm_core.ops import rms_norm


@dataclass(frozen=True)
class LayerSpec:
    """How the forward pass runs one decoder layer.

    attention: "global" (causal over every earlier token) or "sliding" (a key is visible only
    when its position is within `window` of the query's: k_pos > q_pos - window).
    rope: which rotary table the layer uses (Gemma 3 has a local and a global one); None = the
    model's single table.
    """

    attention: str = "global"
    window: int | None = None
    rope: str | None = None


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
    """Generic adapter: image features from `get_image_features`, 1-D positions, Llama-style layers.

    A family overrides the class attributes below and, where it differs, `stack_vision`,
    `image_features_with_carry`, `position_ids`, `rotary`, the residual parts or `inject`.
    """

    family: str = "generic"
    uses_mrope: bool = False
    vision_keys: tuple[str, ...] = ("pixel_values",)
    # decoder-layer classes whose math forward.py / decode_step.py reproduce (checked at load)
    layer_classes: tuple[str, ...] = ()
    # "pre": x + attn(norm(x)), then x + mlp(post_attention_layernorm(x)) (Llama/Qwen);
    # "sandwich": Gemma's extra post-attention and pre/post-feedforward norms
    norm_layout: str = "pre"
    bidirectional_images: bool = False  # image tokens attend to their whole image in prefill
    supports_sliding_window: bool = False
    text_model_attr: str = "language_model"  # where the text decoder sits under `model.model`
    # the vision tower under `model.model` where its input has one fixed size (then it runs compiled
    # with LIGHTVLM_COMPILE; see compiled_prefill.py); None where the patch count varies per image
    fixed_size_vision_tower: str | None = None

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.text_config = model.config.get_text_config()
        self.text_model = getattr(model.model, self.text_model_attr)
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
        self.layer_specs: list[LayerSpec] = self._layer_specs()

    def _layer_specs(self) -> list[LayerSpec]:
        """One LayerSpec per decoder layer, from the text config's `layer_types` / `sliding_window`."""
        window = getattr(self.text_config, "sliding_window", None)
        # without layer_types, a set sliding_window applies to every layer (Mistral)
        kinds = getattr(self.text_config, "layer_types", None) or (
            ["sliding_attention" if window else "full_attention"] * len(self.layers))
        return [LayerSpec("sliding", window) if k == "sliding_attention" else LayerSpec() for k in kinds]

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
        """Input embeddings (T_i, d) per prompt; see `embed_with_carry`."""
        return self.embed_with_carry(prompts, device, dtype)[0]

    @torch.no_grad()
    def embed_with_carry(self, prompts: list[PromptInputs], device: torch.device, dtype: torch.dtype
                         ) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        """Input embeddings (T_i, d) per prompt, image features in the image-token slots, and each
        prompt's carry {name: (T_i, ...)} (per-token extras such as DeepStack, zero on text).

        The vision tower runs once for all images of the batch: `stack_vision` joins the prompts'
        processor tensors (images, tiles or patches), and features come back in order.
        """
        ids = [p.input_ids.to(device) for p in prompts]
        embeds = [self.embed_tokens(i) for i in ids]
        with_images = [i for i, p in enumerate(prompts) if p.num_images]
        carry: list[dict[str, torch.Tensor]] = [{} for _ in prompts]
        if not with_images:
            return embeds, carry
        keys = [k for k in self.vision_keys if k in prompts[with_images[0]].vision]
        vision = {k: self.stack_vision([prompts[i].vision[k] for i in with_images]).to(device) for k in keys}
        if "pixel_values" in vision:
            vision["pixel_values"] = vision["pixel_values"].to(dtype)
        feats, extra = self.image_features_with_carry(vision)
        slots = [ids[i] == self.image_token_id for i in with_images]
        counts = [int(s.sum()) for s in slots]
        if sum(counts) != feats.shape[0]:
            raise ValueError(f"{sum(counts)} image tokens but {feats.shape[0]} image features")
        for i, mask, part in zip(with_images, slots, feats.split(counts)):
            embeds[i] = embeds[i].clone()
            embeds[i][mask] = part.to(embeds[i].dtype)
        for name, per_token in extra.items():  # (N_image_tokens, ...) -> (T_i, ...), zeros on text
            for i, mask, part in zip(with_images, slots, per_token.split(counts)):
                full = part.new_zeros(mask.shape[0], *part.shape[1:])
                full[mask] = part
                carry[i][name] = full
        return embeds, carry

    def stack_vision(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """One processor tensor of the batch from the prompts' own (images/tiles/patches along dim 0)."""
        return torch.cat(tensors)

    def image_features_with_carry(self, vision: dict[str, torch.Tensor]
                                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image features (N, d) and per-image-token extras {name: (N, ...)} (none by default)."""
        return self.image_features(vision), {}

    # --- positions --------------------------------------------------------------------------

    def position_ids(self, prompt: PromptInputs) -> tuple[torch.Tensor, int]:
        """Positions of the prompt tokens, (T,) or (3, T), and the position of the next token."""
        n = prompt.input_ids.shape[0]
        return torch.arange(n), n

    def image_spans(self, input_ids: torch.Tensor) -> list[tuple[int, int]]:
        """[start, end) of every contiguous run of image tokens: one per image, or one per tile where
        the processor separates tiles with layout tokens (Idefics3 / SmolVLM)."""
        is_img = (input_ids == self.image_token_id).tolist()
        spans, start = [], None
        for i, flag in enumerate(is_img + [False]):
            if flag and start is None:
                start = i
            elif not flag and start is not None:
                spans.append((start, i))
                start = None
        return spans

    # --- decoder-layer parts -------------------------------------------------------------------

    def rotary(self, x: torch.Tensor, position_ids: torch.Tensor, rope: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: (B, T, head_dim) for position_ids (B, T) (1-D) or (3, B, T) (M-RoPE).

        `rope` is the layer's LayerSpec.rope (None for single-table models).
        """
        return self.rotary_emb(x, position_ids)

    def attn_residual(self, layer: nn.Module, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        """h after the attention block, given the o_proj output."""
        return h + attn_out

    def mlp_residual(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """h after the MLP block."""
        return h + mlp(layer.mlp, rms_norm(layer.post_attention_layernorm, h))

    def inject(self, layer: int, h: torch.Tensor, carry: dict[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states (B, T, d) after `layer`, plus any per-layer injection from `carry`."""
        return h
