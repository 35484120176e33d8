"""LightVLM pyramid token merging in prefill, and the FastV / random baselines.

At each stage of the plan, every image span of every row keeps its `keep x original` most
important tokens. Importance is the attention that the last prompt tokens (the instruction
suffix) pay to each image token at the layer just before the cut, computed from that layer's
post-RoPE q/k for those few query rows only: O(q·N) memory, no N x N matrix, works with SDPA.

LightVLM ("pyramid", arXiv 2509.00419) merges each removed token into the kept token of the same
span it is most similar to (cosine of hidden states), as a size x importance weighted average;
sizes (originals carried) add up across stages, ToMe-style. FastV (arXiv 2403.06764) and random
just drop. Kept tokens keep their original position ids; text tokens are never touched.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightvlm_core.forward import PrefillState, last_query_attention
from lightvlm_core.reduction.schedule import ReductionPlan

NUM_QUERY_TOKENS = 8  # "last few prompt tokens" whose attention scores image tokens


class TokenMerger:
    """A PrefillHook that applies a ReductionPlan to a batch of prompts."""

    def __init__(self, plan: ReductionPlan, scaling: float, seed: int = 0) -> None:
        self.plan = plan
        self.scaling = scaling
        self.cuts = dict(plan.stages)  # layer -> keep ratio
        self.merge = plan.method == "pyramid"
        self.num_query = 1 if plan.method == "fastv" else NUM_QUERY_TOKENS
        self.score_layers = set() if plan.method == "random" else {layer - 1 for layer in self.cuts}
        self.importance: torch.Tensor | None = None  # (B, T) for the current token set
        self.original_counts: list[list[int]] | None = None  # per row, per span
        self.seed = seed
        self.stage_counts: list[list[int]] = []  # kept image tokens per row after each stage

    # --- PrefillHook ------------------------------------------------------------------------------

    def observe(self, layer: int, state: PrefillState, q: torch.Tensor, k: torch.Tensor) -> None:
        self.importance = self._attention_importance(state, q, k)

    def before_layer(self, layer: int, state: PrefillState) -> PrefillState:
        if self.original_counts is None:
            self.original_counts = [_span_counts(row) for row in state.span]
        if layer not in self.cuts:
            return state
        if self.plan.method == "random":
            self.importance = self._random_importance(state)
        keep_index, keep_valid = self._select(state, self.cuts[layer])
        if self.merge:
            self._merge_dropped(state, keep_index, keep_valid)
        self.importance = None
        state = state.gather(keep_index, keep_valid)
        self.stage_counts.append(((state.span >= 0) & state.valid).sum(dim=1).tolist())
        return state

    # --- scoring ----------------------------------------------------------------------------------

    def _random_importance(self, state: PrefillState) -> torch.Tensor:
        """Uniform random scores, drawn per row from the row's own length (batch-independent)."""
        scores = torch.zeros(state.valid.shape)
        for row, n in enumerate(state.lengths.tolist()):
            scores[row, :n] = torch.rand(n, generator=torch.Generator().manual_seed(self.seed + n))
        return scores.to(state.h.device)

    def _attention_importance(self, state: PrefillState, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean attention (over heads and the last query tokens) paid to each token: (B, T)."""
        probs = last_query_attention(q, k, state, self.num_query, self.scaling)  # (B, H, n_q, T)
        num_present = (probs.sum(dim=-1) > 0).sum(dim=-1).clamp(min=1)  # (B, H)
        return (probs.sum(dim=2) / num_present[..., None]).mean(dim=1)

    # --- selection and merging ---------------------------------------------------------------------

    def _select(self, state: PrefillState, keep: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices (B, T') of the tokens each row keeps, in original order, right-padded."""
        rows = []
        for row in range(state.h.shape[0]):
            valid = state.valid[row]
            keep_mask = valid & (state.span[row] < 0)  # all text tokens
            for span_id, original in enumerate(self.original_counts[row]):
                members = torch.nonzero(valid & (state.span[row] == span_id)).flatten()
                target = max(1, round(keep * original))
                if members.numel() <= target:
                    keep_mask[members] = True
                    continue
                scores = self.importance[row, members]
                top = members[scores.topk(target).indices]
                keep_mask[top] = True
            rows.append(torch.nonzero(keep_mask).flatten())
        width = max(len(r) for r in rows)
        index = torch.zeros(len(rows), width, dtype=torch.long, device=state.h.device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=state.h.device)
        for row, kept in enumerate(rows):
            index[row, : len(kept)] = kept
            valid[row, : len(kept)] = True
        return index, valid

    def _merge_dropped(self, state: PrefillState, keep_index: torch.Tensor, keep_valid: torch.Tensor) -> None:
        """Fold each dropped image token into its most similar kept token of the same span (in place)."""
        for row in range(state.h.shape[0]):
            kept = keep_index[row, keep_valid[row]]
            is_kept = torch.zeros_like(state.valid[row])
            is_kept[kept] = True
            for span_id in range(len(self.original_counts[row])):
                in_span = state.valid[row] & (state.span[row] == span_id)
                dst = torch.nonzero(in_span & is_kept).flatten()
                src = torch.nonzero(in_span & ~is_kept).flatten()
                if src.numel() and dst.numel():
                    merge_into(state, row, src, dst, self.importance[row])


def merge_into(state: PrefillState, row: int, src: torch.Tensor, dst: torch.Tensor,
               importance: torch.Tensor) -> None:
    """Merge tokens `src` of `row` into their most similar tokens among `dst` (in place).

    Each destination becomes the weighted average of itself and the tokens assigned to it, with
    weight = size x importance (so a token standing for many originals, or an important one,
    dominates); its size becomes the sum of the sizes. Computed in float32.
    """
    h = state.h[row]
    sim = F.normalize(h[src].float(), dim=-1) @ F.normalize(h[dst].float(), dim=-1).T
    target = sim.argmax(dim=-1)  # (n_src,) index into dst
    size = state.size[row]
    weight = size * (importance.float() + 1e-6)
    w_src, w_dst = weight[src], weight[dst]
    total = w_dst.clone().index_add_(0, target, w_src)
    summed = (h[dst].float() * w_dst[:, None]).index_add_(0, target, h[src].float() * w_src[:, None])
    h[dst] = (summed / total[:, None]).to(h.dtype)
    size[dst] = size[dst].index_add(0, target, size[src])


def _span_counts(span_row: torch.Tensor) -> list[int]:
    n = int(span_row.max()) + 1 if span_row.numel() else 0
    return [int((span_row == i).sum()) for i in range(max(n, 0))]
