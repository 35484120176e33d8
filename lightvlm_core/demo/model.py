"""The shapes-demo LLaVA: build it from a recipe, initialise its vision tower, warm-start it from
an export, and run it on packed batches (``packing.pack``)."""

from __future__ import annotations

import torch

from . import scenes as S
from .packing import PREFIX_LEN
from .processor import BOS_ID, EOS_ID, GRID, IMAGE_ID, IMAGE_SEQ_LEN, PAD_ID, PATCH_SIZE, VOCAB


def build_model(cfg: dict):
    """A freshly initialised ``LlavaForConditionalGeneration`` of the recipe's sizes (fp32)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(
        image_size=S.MODEL_SIZE, patch_size=PATCH_SIZE, hidden_size=cfg["vis_hidden"],
        intermediate_size=cfg["vis_mlp"], num_hidden_layers=cfg["vis_layers"],
        num_attention_heads=cfg["vis_heads"], projection_dim=cfg["vis_hidden"],
    )
    tc = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=cfg["txt_hidden"], intermediate_size=cfg["txt_mlp"],
        num_hidden_layers=cfg["txt_layers"], num_attention_heads=cfg["txt_heads"],
        num_key_value_heads=cfg["txt_kv_heads"], max_position_embeddings=512,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=IMAGE_ID, image_seq_length=IMAGE_SEQ_LEN,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True,
        projector_hidden_act="gelu",
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    init_vision(model, cfg)
    return model


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) 2D sin/cos position code: half the channels encode y, half x."""
    d = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(d, dtype=torch.float32) / d))
    ys, xs = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    out = []
    for c in (ys.flatten(), xs.flatten()):
        a = c[:, None] * omega[None]
        out += [torch.sin(a), torch.cos(a)]
    pe = torch.cat(out, 1)
    if pe.shape[1] < dim:
        pe = torch.cat([pe, torch.zeros(pe.shape[0], dim - pe.shape[1])], 1)
    return pe


@torch.no_grad()
def init_vision(model, cfg: dict) -> None:
    """Locality-friendly initialisation of the from-scratch CLIP tower (training speed only).

    * ``pos_init=sincos``: position embeddings start as a 2D sin/cos code, scaled to the
      patch-embedding norm, so nearby patches have similar codes from step 0.
    * ``qk_init=tied``: each attention layer starts with ``W_k = W_q`` (bias 0), so
      ``W_q W_k^T`` is positive semi-definite: tokens attend to tokens that look alike,
      i.e. to nearby patches and patches of the same colour (object grouping).
    """
    vt = model.model.vision_tower
    dim = cfg["vis_hidden"]
    if cfg.get("pos_init") == "sincos":
        pe = sincos_2d(dim, GRID)
        g = torch.Generator().manual_seed(1234)
        # typical patch-embedding norm for a CLIP-normalised image (bg ~ +1.9, objects ~ -1..1)
        x = torch.randn(8, 3, S.MODEL_SIZE, S.MODEL_SIZE, generator=g) * 0.3 + 1.5
        pn = vt.embeddings.patch_embedding(x).flatten(2).transpose(1, 2).norm(dim=-1).mean()
        scale = float(pn / pe.norm(dim=-1).mean())
        w = vt.embeddings.position_embedding.weight
        w[1:] = pe * scale
        w[0] = 0.0
    if cfg.get("qk_init") == "tied":
        for layer in vt.encoder.layers:
            a = layer.self_attn
            a.q_proj.weight.normal_(0.0, cfg["qk_std"])
            a.k_proj.weight.copy_(a.q_proj.weight)
            a.q_proj.bias.zero_()
            a.k_proj.bias.zero_()


def warm_start(model, init_dir: str) -> None:
    """Load an exported checkpoint (fp16 safetensors) into the freshly built fp32 model."""
    from transformers import LlavaForConditionalGeneration
    src = LlavaForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)


def packed_forward(model, pixel_values, ids, pos, mask, sup_b, sup_p, mid_layer=None):
    """Returns (logits at supervised positions, projected image tokens[, hidden state at
    the supervised positions after ``mid_layer`` decoder layers])."""
    inner = model.model
    vis = inner.vision_tower(pixel_values)
    feats = vis.last_hidden_state[:, 1:]  # == hidden_states[-1][:, 1:] (vision_feature_layer=-1, "default")
    img_tok = inner.multi_modal_projector(feats)
    emb = inner.language_model.embed_tokens(ids)
    emb = torch.cat([emb[:, :2], img_tok.to(emb.dtype), emb[:, PREFIX_LEN:]], 1)
    out = inner.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                               output_hidden_states=mid_layer is not None)
    logits = model.lm_head(out.last_hidden_state[sup_b, sup_p])
    if mid_layer is None:
        return logits, img_tok
    return logits, img_tok, out.hidden_states[mid_layer][sup_b, sup_p]


def image_tokens(model, pixel_values):
    """Projected image tokens alone (phase 1 trains only the vision tower and projector)."""
    feats = model.model.vision_tower(pixel_values).last_hidden_state[:, 1:]
    return model.model.multi_modal_projector(feats)
