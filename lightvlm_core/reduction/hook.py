"""The prefill hook that runs any reduction method: per-row, per-span selection, gather and merge.

Every image span of every row is reduced on its own budget (`span_target(keep, original)`), so a
row gives the same result alone or in a batch. A pre-LLM method acts before layer 0 on the
projected image features (the embeddings the first layer would see); an in-LLM method acts
before each of its stage layers, scored by attention computed at the layer before. The hook
tracks the original index of every token, so it can report which image cells each stage kept
(`kept_patches`, for the playground's overlay).
"""

from __future__ import annotations

import math

import torch

from lightvlm_core.forward import PrefillState, last_query_attention
from lightvlm_core.reduction.base import InLLMMethod, ReductionMethod, span_target
from lightvlm_core.reduction.merger import merge_into
from lightvlm_core.types import KeptPatches


class ReductionHook:
    """A forward.PrefillHook applying one ReductionMethod to a batch of prompts."""

    def __init__(self, method: ReductionMethod, num_layers: int, scaling: float) -> None:
        self.method = method
        self.scaling = scaling
        self.in_llm = isinstance(method, InLLMMethod)
        self.cuts = dict(method.stages(num_layers)) if self.in_llm else {}
        needs_scores = self.in_llm and method.query != 0
        self.score_layers = {layer - 1 for layer in self.cuts} if needs_scores else set()
        self.importance: torch.Tensor | None = None  # (B, T) for the current token set
        self.original_counts: list[list[int]] | None = None  # per row, per span
        self.span_starts: list[list[int]] = []
        self.origin: torch.Tensor | None = None  # (B, T) original index of every current token
        self.stage_counts: list[list[int]] = []  # kept image tokens per row after each stage
        self.stage_origins: list[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]] = []

    # --- PrefillHook ------------------------------------------------------------------------------

    def observe(self, layer: int, state: PrefillState, q: torch.Tensor, k: torch.Tensor) -> None:
        self.importance = self._attention_importance(state, q, k)

    def before_layer(self, layer: int, state: PrefillState) -> PrefillState:
        if self.original_counts is None:
            self._start(state)
        if layer == 0 and not self.in_llm:
            return self._record(0, 0, self._pre_llm(state))
        if layer not in self.cuts:
            return state
        if self.importance is None:  # a method that needs no attention
            self.importance = torch.zeros(state.valid.shape, device=state.h.device)
        keep_mask = self._select(state, self.cuts[layer])
        if self.method.merge:
            self._merge_dropped(state, keep_mask)
        self.importance = None
        stage = len(self.stage_counts) + 1
        return self._record(stage, layer, self._gather(state, keep_mask))

    # --- the overlay ------------------------------------------------------------------------------

    def kept_patches(self, row: int, grids: list[tuple[int, int]] | None = None) -> list[KeptPatches]:
        """Which cells of each image of `row` every stage kept (grids default to square or 1 x N)."""
        out = []
        for stage, layer, origin, span, valid in self.stage_origins:
            for image, (start, count) in enumerate(zip(self.span_starts[row], self.original_counts[row])):
                mine = valid[row] & (span[row] == image)
                cells = sorted((origin[row, mine] - start).tolist())
                grid = grids[image] if grids else _default_grid(count)
                out.append(KeptPatches(image=image, stage=stage, layer=layer, grid=grid, indices=cells))
        return out

    # --- bookkeeping ------------------------------------------------------------------------------

    def _start(self, state: PrefillState) -> None:
        self.original_counts, self.span_starts = [], []
        for row in range(state.span.shape[0]):
            counts, starts = [], []
            for span_id in range(int(state.span[row].max()) + 1):
                where = torch.nonzero(state.span[row] == span_id).flatten()
                counts.append(int(where.numel()))
                starts.append(int(where[0]) if where.numel() else 0)
            self.original_counts.append(counts)
            self.span_starts.append(starts)
        self.origin = torch.arange(state.h.shape[1], device=state.h.device).expand(state.h.shape[0], -1)

    def _record(self, stage: int, layer: int, state: PrefillState) -> PrefillState:
        self.stage_counts.append(((state.span >= 0) & state.valid).sum(dim=1).tolist())
        self.stage_origins.append((stage, layer, self.origin, state.span, state.valid))
        return state

    def _gather(self, state: PrefillState, keep_mask: torch.Tensor) -> PrefillState:
        rows = [torch.nonzero(m).flatten() for m in keep_mask]
        width = max(len(r) for r in rows)
        index = torch.zeros(len(rows), width, dtype=torch.long, device=state.h.device)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=state.h.device)
        for row, kept in enumerate(rows):
            index[row, : len(kept)] = kept
            valid[row, : len(kept)] = True
        self.origin = self.origin.gather(1, index)
        return state.gather(index, valid)

    def _spans(self, state: PrefillState, row: int):
        """(span id, member positions, target count) for every image span of `row`."""
        for span_id, original in enumerate(self.original_counts[row]):
            members = torch.nonzero(state.valid[row] & (state.span[row] == span_id)).flatten()
            yield span_id, members, original

    # --- pre-LLM ----------------------------------------------------------------------------------

    def _pre_llm(self, state: PrefillState) -> PrefillState:
        keep_mask = state.valid & (state.span < 0)
        for row in range(state.h.shape[0]):
            text = state.h[row, _instruction_positions(state, row)]
            for _, members, original in self._spans(state, row):
                target = span_target(self.method.keep_ratio, original)
                if members.numel() <= target:
                    keep_mask[row, members] = True
                    continue
                local, feats, sizes = self.method.reduce(state.h[row, members], text, target)
                chosen = members[local]
                if feats is not None:
                    state.h[row, chosen] = feats.to(state.h.dtype)
                if sizes is not None:
                    state.size[row, chosen] = sizes.to(state.size.dtype)
                keep_mask[row, chosen] = True
        return self._gather(state, keep_mask)

    # --- in-LLM -----------------------------------------------------------------------------------

    def _attention_importance(self, state: PrefillState, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Mean attention (over heads and the query tokens) paid to each token: (B, T)."""
        query = self.method.query
        if query == "text":
            probs = _text_query_attention(q, k, state, self.scaling)
        else:
            probs = last_query_attention(q, k, state, int(query), self.scaling)  # (B, H, n_q, T)
        num_present = (probs.sum(dim=-1) > 0).sum(dim=-1).clamp(min=1)  # (B, H)
        return (probs.sum(dim=2) / num_present[..., None]).mean(dim=1)

    def _select(self, state: PrefillState, keep: float) -> torch.Tensor:
        """(B, T) mask of the tokens each row keeps: all text, and `keep` of every image span."""
        keep_mask = state.valid & (state.span < 0)
        for row in range(state.h.shape[0]):
            for _, members, original in self._spans(state, row):
                target = span_target(keep, original)
                if members.numel() <= target:
                    keep_mask[row, members] = True
                    continue
                local = self.method.choose(self.importance[row, members], state.h[row, members], target)
                keep_mask[row, members[local]] = True
        return keep_mask

    def _merge_dropped(self, state: PrefillState, keep_mask: torch.Tensor) -> None:
        """Fold each dropped image token into its most similar kept token of the same span (in place)."""
        by_size = getattr(self.method, "merge_by", "size_importance") == "size"
        for row in range(state.h.shape[0]):
            for _, members, _ in self._spans(state, row):
                dst = members[keep_mask[row, members]]
                src = members[~keep_mask[row, members]]
                if src.numel() and dst.numel():
                    weight = torch.ones_like(self.importance[row]) if by_size else self.importance[row]
                    merge_into(state, row, src, dst, weight)


def _instruction_positions(state: PrefillState, row: int) -> torch.Tensor:
    """Text tokens after the row's last image token (all text if none follow)."""
    text = state.valid[row] & (state.span[row] < 0)
    image = torch.nonzero(state.span[row] >= 0).flatten()
    after = text.clone()
    if image.numel():
        after[: int(image[-1]) + 1] = False
    return torch.nonzero(after if after.any() else text).flatten()


def _text_query_attention(q: torch.Tensor, k: torch.Tensor, state: PrefillState, scaling: float) -> torch.Tensor:
    """Attention from every text token after each row's last image token: (B, H, n_q, T), zero-padded."""
    b, h, t, d = q.shape
    rows = [_instruction_positions(state, row) for row in range(b)]
    n_q = max(len(r) for r in rows)
    index = torch.zeros(b, n_q, dtype=torch.long, device=q.device)
    present = torch.zeros(b, n_q, dtype=torch.bool, device=q.device)
    for row, pos in enumerate(rows):
        index[row, : len(pos)] = pos
        present[row, : len(pos)] = True
    q_sel = q.gather(2, index[:, None, :, None].expand(b, h, n_q, d))
    k_full = k.repeat_interleave(h // k.shape[1], dim=1)
    logits = torch.einsum("bhqd,bhtd->bhqt", q_sel.float(), k_full.float()) * scaling
    keys = torch.arange(t, device=q.device)
    allowed = state.valid[:, None, None, :] & (keys[None, None, None, :] <= index[:, None, :, None])
    probs = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return probs * present[:, None, :, None]


def _default_grid(count: int) -> tuple[int, int]:
    side = math.isqrt(count)
    return (side, side) if side * side == count else (1, count)
