"""One decode step of the language model for every running row: the eager layer loop, and where
the runner's compiled or fused programs (compiled_decode.py, fused_decode.py, graphed_decode.py)
take the layers over (`CompiledLayers`).

Same math as the HuggingFace decoder layers, on the engine's own batched KV cache (kv/cache.py):
one new entry per row and layer, rows of different lengths masked, and, where a row's KV policy
reads them, the attention each entry receives added to the cache's heavy-hitter scores.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

from lightvlm_core import forward
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.models.base import LayerSpec, ModelAdapter
from lightvlm_core.ops import rms_norm

if TYPE_CHECKING:
    from lightvlm_core.rope_table import RopeTable


@torch.inference_mode()
def decode(adapter: ModelAdapter, cache: BatchedKVCache, input_ids: torch.Tensor, pos: torch.Tensor,
           compiled: CompiledLayers | None = None, rope_table: RopeTable | None = None) -> torch.Tensor:
    """One decode step for every row: input_ids (B,), pos (B,) or (3, B). Returns logits (B, V).

    When `cache.scores` is enabled, the attention probabilities of this step are added to it
    (the heavy-hitter statistic for KV compression), which needs the explicit softmax path.
    `compiled` (see compiled_decode.py) runs the layers instead, where it applies to this step;
    `rope_table` (rope_table.py) gives the rotary tables by lookup where it can.
    """
    cache.reserve(1)
    h = adapter.embed_tokens(input_ids)[:, None]  # (B, 1, d)
    looked_up = rope_table.lookup(h, pos) if rope_table is not None else None
    if looked_up is not None:
        ropes = {None: looked_up}
    else:
        ropes = {kind: forward.RopeTables.build(*adapter.rotary(h, pos[..., None], kind))
                 for kind in dict.fromkeys(spec.rope for spec in adapter.layer_specs)}  # once per kind
    if compiled is not None and compiled.applies(adapter, cache):
        logits = compiled(adapter, cache, h, ropes)
        if logits is not None:  # None: it could not compile (it says why once); eager from here on
            return logits
    groups = adapter.num_heads // adapter.num_kv_heads
    # only rows whose KV policy reads decode-time scores pay for the explicit softmax
    scoring = cache.scoring_step()
    # the step's 1-D position (M-RoPE: the temporal row), only where a sliding layer needs it
    sliding = any(spec.attention == "sliding" for spec in adapter.layer_specs)
    text_pos = (pos[0] if pos.dim() == 2 else pos).to(torch.int32) if sliding else None

    def attend(i: int, spec: LayerSpec, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keys, values, mask = cache.append(i, k[:, :, 0], v[:, :, 0], text_pos)
        if spec.attention == "sliding":  # per KV head from here: (B, H_kv, S)
            entry_pos = cache.positions[i][:, :, : mask.shape[1]]
            mask = mask[:, None, :] & _decode_window(entry_pos, text_pos, spec.window)
        if scoring:
            return attend_and_score(q, keys, values, mask, adapter.scaling, groups, cache.scores[i],
                                    cache.score_rows)
        # rows of equal length need no mask (all True: the same result, a faster kernel)
        needed = spec.attention == "sliding" or cache.ragged(i)
        return F.scaled_dot_product_attention(q, keys, values, scale=adapter.scaling, enable_gqa=groups > 1,
                                              attn_mask=_query_head_mask(mask, groups) if needed else None)

    return decode_layers(adapter, h, ropes, attend)


class CompiledLayers(Protocol):
    """The decode step's layers as one compiled program (compiled_decode.CompiledDecode)."""

    def applies(self, adapter: ModelAdapter, cache: BatchedKVCache) -> bool:
        """Whether this step can run compiled (else the eager loop runs)."""

    def __call__(self, adapter: ModelAdapter, cache: BatchedKVCache, h: torch.Tensor,
                 ropes: dict[str | None, forward.RopeTables]) -> torch.Tensor | None:
        """Logits (B, V) of the step, with the KV cache appended to as `decode_layers` does; None,
        with the cache untouched, where the layers could not be compiled."""


def decode_layers(adapter: ModelAdapter, h: torch.Tensor, ropes: dict[str | None, forward.RopeTables], attend
                  ) -> torch.Tensor:
    """Every decoder layer for one new token per row, then the final norm and the LM head.

    h: (B, 1, d). `attend(i, spec, q, k, v)` appends layer i's new k, v (B, H_kv, 1, D) to the
    cache and returns the attention output (B, H, 1, D) for q (B, H, 1, D). Returns logits (B, V).
    """
    for i, layer in enumerate(adapter.layers):
        spec = adapter.layer_specs[i]
        x = rms_norm(layer.input_layernorm, h)
        q, k, v = forward.rotary_qkv(adapter, layer.self_attn, x, ropes[spec.rope])
        out = attend(i, spec, q, k, v).transpose(1, 2).reshape(h.shape[0], 1, -1)
        h = adapter.mlp_residual(layer, adapter.attn_residual(layer, h, layer.self_attn.o_proj(out)))
    return adapter.lm_head(rms_norm(adapter.norm, h))[:, 0].float()


def _decode_window(entry_pos: torch.Tensor, query_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H_kv, S) entries whose ORIGINAL position is within the query's window.

    transformers' sliding mask (k_pos > q_pos - window), measured in positions rather than in
    entries, so holes left by token reduction or KV eviction are not refilled from further back.
    entry_pos: (B, H_kv, S), query_pos: (B,).
    """
    return entry_pos > (query_pos - window)[:, None, None]


def _query_head_mask(mask: torch.Tensor, groups: int) -> torch.Tensor:
    """Key mask (B, S), or per KV head (B, H_kv, S), as an SDPA mask over the query heads."""
    if mask.dim() == 2:
        return mask[:, None, None, :]
    return mask.repeat_interleave(groups, dim=1)[:, :, None, :]


def attend_and_score(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                     scale: float, groups: int, scores: torch.Tensor, rows: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """Single-query attention with explicit probabilities; adds them into scores (B, H_kv, S_cap)
    for the `rows` (B,) bool that accumulate (all when None). mask: (B, S) or (B, H_kv, S)."""
    b, h_kv, s, d = keys.shape
    qg = q.view(b, h_kv, groups, d)
    logits = torch.einsum("bkgd,bksd->bkgs", qg.float(), keys.float()) * scale
    key_mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, :, None, :]
    logits = logits.masked_fill(~key_mask, float("-inf"))
    probs = logits.softmax(dim=-1)
    received = probs.sum(dim=2)
    scores[:, :, :s] += received if rows is None else received * rows[:, None, None]
    out = torch.einsum("bkgs,bksd->bkgd", probs.to(values.dtype), values)
    return out.reshape(b, h_kv * groups, 1, d)
