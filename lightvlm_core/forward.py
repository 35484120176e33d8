"""The language model's prefill, run layer by layer by the engine, and what the decode step
(decode_step.py) shares with it: the rotary tables, q/k/v with RoPE, the LM head.

Same math as the HuggingFace decoder layers (pre-norm attention + MLP, RoPE, GQA), but with the
KV cache and masks built here, so that token reduction can act between the prefill's layers; the
decode steps then append to that cache, where KV compression acts on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lightvlm_core.fusion import fused_qkv, project_qkv
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.models.base import LayerSpec, ModelAdapter
from lightvlm_core.ops import rms_norm

SNAPKV_WINDOW = 8  # prompt tokens whose attention seeds the KV heavy-hitter scores


@dataclass
class PrefillState:
    """A right-padded batch of prompts as it moves through the layers.

    h: (B, T, d) hidden states; valid: (B, T) real tokens (packed at the front of each row);
    pos: (B, T) or (3, B, T) original position ids (never renumbered by reduction);
    span: (B, T) index of the image span a token belongs to, -1 for text;
    size: (B, T) how many original tokens each token now carries (merging adds up);
    carry: per-token family features {name: (B, T, ...)} (Qwen3-VL DeepStack), zero on text,
    gathered with their tokens and read by `adapter.inject`.
    """

    h: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor
    span: torch.Tensor
    size: torch.Tensor
    carry: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def lengths(self) -> torch.Tensor:
        return self.valid.sum(dim=1)

    def gather(self, index: torch.Tensor, valid: torch.Tensor) -> PrefillState:
        """Keep tokens `index` (B, T') of each row; `valid` (B, T') marks real ones."""
        pos = self.pos.gather(2, index.expand(3, -1, -1)) if self.pos.dim() == 3 else self.pos.gather(1, index)
        return PrefillState(
            h=self.h.gather(1, index[..., None].expand(-1, -1, self.h.shape[-1])),
            valid=valid,
            pos=pos,
            span=self.span.gather(1, index),
            size=self.size.gather(1, index),
            carry={name: _gather_tokens(c, index) for name, c in self.carry.items()},
        )

    @property
    def text_pos(self) -> torch.Tensor:
        """(B, T) 1-D positions (M-RoPE's temporal row), for causality and sliding windows."""
        return self.pos[0] if self.pos.dim() == 3 else self.pos


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B, T, ...) -> (B, T', ...) at index (B, T')."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(*index.shape, *x.shape[2:]))


class PrefillHook(Protocol):
    """Token reduction plugs in here (see lightvlm_core/reduction)."""

    score_layers: set[int]

    def observe(self, layer: int, state: PrefillState, q: torch.Tensor, k: torch.Tensor) -> None:
        """Called after `layer` (in score_layers) with its post-RoPE q (B,H,T,D) and k (B,H_kv,T,D)."""

    def before_layer(self, layer: int, state: PrefillState) -> PrefillState:
        """Called before each layer; may return a reduced state."""


@dataclass(frozen=True)
class RopeTables:
    """One rotary table, prepared once for all the layers that share it.

    HF's `x * cos + rotate_half(x) * sin` with rotate_half(x) = cat(-x2, x1) is computed as
    `x * cos + roll(x) * signed_sin`, roll(x) = cat(x2, x1) and signed_sin = cat(-sin1, sin2):
    negating a factor is exact, so the result is bitwise the same with three ops fewer per layer.
    """

    cos: torch.Tensor  # (B, 1, T, D)
    signed_sin: torch.Tensor  # (B, 1, T, D)

    @classmethod
    def build(cls, cos: torch.Tensor, sin: torch.Tensor) -> RopeTables:
        """From the adapter's cos, sin: (B, T, D)."""
        half = sin.shape[-1] // 2
        return cls(cos.unsqueeze(1), torch.cat((-sin[..., :half], sin[..., half:]), dim=-1).unsqueeze(1))

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D)."""
        return x * self.cos + x.roll(x.shape[-1] // 2, dims=-1) * self.signed_sin


def rotary_qkv(adapter: ModelAdapter, attn: nn.Module, x: torch.Tensor, rope: RopeTables
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q: (B, H, T, D), k and v: (B, H_kv, T, D), RoPE applied to q and k."""
    b, t, _ = x.shape
    d = adapter.head_dim
    fused = fused_qkv(attn)
    if fused is not None and not hasattr(attn, "q_norm"):
        # one GEMM; q and k sit side by side in its output, so RoPE runs on them with no copy first
        qkv = fused.project(x)
        n_qk = fused.sizes[0] + fused.sizes[1]
        qk, v = qkv[..., :n_qk].view(b, t, -1, d), qkv[..., n_qk:]
        num_q = fused.sizes[0] // d
    else:
        q, k, v = project_qkv(attn, x)
        q, k = q.view(b, t, -1, d), k.view(b, t, -1, d)
        if hasattr(attn, "q_norm"):  # Qwen3-style per-head norms
            q, k = rms_norm(attn.q_norm, q), rms_norm(attn.k_norm, k)
        # RoPE on q and k together: the same elementwise ops, half as many calls
        qk, num_q = torch.cat([q, k], dim=2), q.shape[2]
    v = v.reshape(b, t, -1, d).transpose(1, 2)
    qk = rope.apply(qk.transpose(1, 2))
    q, k = qk.split([num_q, qk.shape[1] - num_q], dim=1)
    if t > 1:  # kept by the prefill cache: not views holding the rest of a bigger buffer
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


def prefill_mask(adapter: ModelAdapter, spec: LayerSpec, state: PrefillState) -> torch.Tensor:
    """(B, 1, T, T) boolean attention mask of one layer during prefill.

    Causal over the row's real tokens (rows keep their tokens in original order, so index order is
    position order); image tokens also see their whole image where the family is bidirectional
    (Gemma 3); sliding layers see only keys whose ORIGINAL position is within the window, so the
    window stays right after token reduction drops tokens.
    """
    t = state.h.shape[1]
    allowed = torch.ones(t, t, dtype=torch.bool, device=state.h.device).tril()[None]
    if adapter.bidirectional_images:
        span = state.span
        allowed = allowed | ((span[:, :, None] == span[:, None, :]) & (span[:, :, None] >= 0))
    if spec.attention == "sliding":
        pos = state.text_pos
        allowed = allowed & (pos[:, None, :] > pos[:, :, None] - spec.window)
    return (allowed & state.valid[:, None, :])[:, None]


def last_query_attention(q: torch.Tensor, k: torch.Tensor, state: PrefillState, num_query: int,
                         scaling: float) -> torch.Tensor:
    """Attention probabilities from each row's last `num_query` prompt tokens: (B, H, n_q, T).

    Only those few query rows are computed (O(n_q * T), no T x T matrix), from post-RoPE q
    (B, H, T, D) and k (B, H_kv, T, D). Rows shorter than n_q get zeros for the missing queries.
    """
    b, h, t, d = q.shape
    n_q = min(num_query, t)
    last = state.lengths[:, None] - 1 - torch.arange(n_q, device=q.device)[None]  # (B, n_q)
    present = last >= 0
    last = last.clamp(min=0)
    q_sel = q.gather(2, last[:, None, :, None].expand(b, h, n_q, d))
    k_full = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhtd->bhqt", q_sel.float(), k_full.float()) * scaling
    keys = torch.arange(t, device=q.device)
    allowed = state.valid[:, None, None, :] & (keys[None, None, None, :] <= last[:, None, :, None])
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return probs * present[:, None, :, None]


def prefill_layer(adapter: ModelAdapter, layer: nn.Module, h: torch.Tensor, rope: RopeTables,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoder layer over the prompts h (B, T, d), causal where `mask` (B, 1, T, T) is None.

    Returns the layer's output hidden states (before any family injection), its post-RoPE q
    (B, H, T, D) and its k and v (B, H_kv, T, D), which the cache keeps.
    """
    x = rms_norm(layer.input_layernorm, h)
    q, k, v = rotary_qkv(adapter, layer.self_attn, x, rope)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=adapter.scaling,
                                         enable_gqa=adapter.num_kv_heads != adapter.num_heads)
    out = out.transpose(1, 2).reshape(*h.shape[:2], -1)
    h = adapter.attn_residual(layer, h, layer.self_attn.o_proj(out))
    return adapter.mlp_residual(layer, h), q, k, v


class CompiledPrefillLayers(Protocol):
    """Causal prefill layers as a compiled program (compiled_prefill.CompiledPrefill)."""

    def layer(self, adapter: ModelAdapter, layer: nn.Module, h: torch.Tensor, rope: RopeTables
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """`prefill_layer(adapter, layer, h, rope, None)`; None where it could not compile."""


class PrefillRun:
    """A prefill that can stop between layers and go on in a later step (layer-sliced prefill).

    The engine runs long prompts a few layers per step, between the decode steps of the running
    rows, so a long prefill does not stall them. Slicing by layers rather than by tokens keeps
    token reduction exact: each layer still sees the whole prompt (the pyramid cut needs the
    whole image span at the cut layer), and the result is bitwise that of one uninterrupted pass.
    """

    def __init__(self, adapter: ModelAdapter, state: PrefillState, hook: PrefillHook | None = None,
                 kv_scores: bool = False, compiled: CompiledPrefillLayers | None = None) -> None:
        self.adapter, self.state, self.hook, self.kv_scores = adapter, state, hook, kv_scores
        self.compiled = compiled  # runs the causal layers instead of `prefill_layer` (compiled_prefill.py)
        self.next_layer = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []
        self._lengths: list[torch.Tensor] = []
        self._scores: list[torch.Tensor] = []
        self._positions: list[torch.Tensor | None] = []
        # one rotary table per kind while the positions stay the same tensor (reduction makes a new one)
        self._ropes: dict[str | None, tuple[torch.Tensor, RopeTables]] = {}

    @property
    def done(self) -> bool:
        return self.next_layer >= len(self.adapter.layers)

    @torch.inference_mode()
    def advance(self, until: int | None = None) -> None:
        """Run the layers from `next_layer` up to `until` (exclusive; None: to the last)."""
        adapter = self.adapter
        until = len(adapter.layers) if until is None else min(until, len(adapter.layers))
        groups = adapter.num_heads // adapter.num_kv_heads
        for i in range(self.next_layer, until):
            layer, spec = adapter.layers[i], adapter.layer_specs[i]
            if self.hook is not None:
                self.state = self.hook.before_layer(i, self.state)
            state = self.state
            if self._ropes.get(spec.rope, (None,))[0] is not state.pos:
                self._ropes[spec.rope] = (state.pos, RopeTables.build(*adapter.rotary(state.h, state.pos, spec.rope)))
            rope = self._ropes[spec.rope][1]
            # Rows are right-padded and keep their tokens in position order, so plain causal attention
            # is exact for every real token (bitwise equal to the explicit mask, and faster); only
            # bidirectional images and sliding windows need the explicit mask.
            explicit = adapter.bidirectional_images or spec.attention == "sliding"
            done = None
            if self.compiled is not None and not explicit:
                done = self.compiled.layer(adapter, layer, state.h, rope)
            if done is None:  # eager (also where the compiled layer could not compile)
                done = prefill_layer(adapter, layer, state.h, rope,
                                     prefill_mask(adapter, spec, state) if explicit else None)
            h, q, k, v = done
            state.h = adapter.inject(i, h, state.carry)
            self._keys.append(k)
            self._values.append(v)
            self._lengths.append(state.lengths)
            self._positions.append(_entry_positions(state, k.shape[1]) if spec.attention == "sliding" else None)
            if self.hook is not None and i in self.hook.score_layers:
                self.hook.observe(i, state, q, k)
            if self.kv_scores:
                probs = last_query_attention(q, k, state, SNAPKV_WINDOW, adapter.scaling)  # (B, H, n_q, T)
                b, _, _, t_l = probs.shape
                self._scores.append(probs.sum(dim=2).view(b, adapter.num_kv_heads, groups, t_l).sum(dim=2))
            self.next_layer = i + 1

    def result(self) -> tuple[torch.Tensor, BatchedKVCache, list[torch.Tensor]]:
        """After the last layer: see `prefill`."""
        if not self.done:
            raise RuntimeError(f"prefill stopped at layer {self.next_layer} of {len(self.adapter.layers)}")
        state = self.state
        last = state.lengths - 1
        h_last = state.h[torch.arange(state.h.shape[0], device=last.device), last]
        cache = BatchedKVCache(self._keys, self._values, torch.stack(self._lengths), self._positions)
        if self.kv_scores:
            cache.scores = self._scores
        with torch.inference_mode():
            return rms_norm(self.adapter.norm, h_last[:, None])[:, 0], cache, self._lengths


def prefill(adapter: ModelAdapter, state: PrefillState, hook: PrefillHook | None = None,
            kv_scores: bool = False) -> tuple[torch.Tensor, BatchedKVCache, list[torch.Tensor]]:
    """Run every layer over the prompts.

    Returns the final-normed hidden state of each row's last prompt token (B, d), the KV cache
    (each layer holding that layer's tokens) and the per-layer valid-token counts (B,) per layer.
    With `kv_scores`, the cache's heavy-hitter scores start from the attention that the prompt's
    last tokens pay to each entry (SnapKV-style), so the first compaction already knows what matters.
    """
    run = PrefillRun(adapter, state, hook, kv_scores)
    run.advance()
    return run.result()


def _entry_positions(state: PrefillState, num_kv_heads: int) -> torch.Tensor:
    """(B, H_kv, T) int32 original positions of a layer's entries (one copy per KV head)."""
    pos = state.text_pos.to(torch.int32)
    return pos[:, None, :].expand(-1, num_kv_heads, -1).contiguous()


@torch.inference_mode()
def logits_for(adapter: ModelAdapter, h_last: torch.Tensor) -> torch.Tensor:
    """h_last: (B, d) final-normed hidden states -> (B, V) float logits."""
    return adapter.lm_head(h_last).float()
