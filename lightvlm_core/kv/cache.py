"""A batched KV cache in which every layer and every row has its own length.

Token merging makes later layers hold fewer prompt entries than early ones, and rows of a batch
hold different prompts, so lengths are kept per (layer, row). Entries of a row are packed at the
front of its slot: row b of layer l holds `lengths[l, b]` valid entries, the rest is padding that
the attention mask hides. Rows join (after their prefill) with `extend` and leave with `select`.

Sliding-window layers also record each entry's original 1-D position, so that their decode
window stays measured in positions after token reduction or KV eviction left holes in a row.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

SLACK = 16  # spare slots kept after a trim so the next decode steps need no reallocation


class BatchedKVCache:
    """keys[l], values[l]: (B, H_kv, S_l, D), S_l >= lengths[l].max(); lengths: (L, B) long.

    `scores[l]` (B, H_kv, S_l), when enabled, accumulates the attention each entry received from
    decode queries (summed over the query heads of its KV group): the heavy-hitter statistic that
    KV compression evicts by.

    `positions[l]` (B, H_kv, S_l) int32: the original text position of each entry, kept only for
    the layers that need it (sliding windows), None elsewhere, so other layers pay nothing. Per KV
    head, because eviction keeps different entries in each head.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor,
                 positions: list[torch.Tensor | None] | None = None) -> None:
        self.keys = keys
        self.values = values
        self.lengths = lengths
        self.positions = positions if positions is not None else [None] * len(keys)
        self.scores: list[torch.Tensor] | None = None
        # (B,) bool: rows whose decode queries add to `scores` (the KV policy's choice); None: all
        self.score_rows: torch.Tensor | None = None

    @classmethod
    def empty(cls, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              device: torch.device) -> BatchedKVCache:
        def blank() -> torch.Tensor:
            return torch.zeros(0, num_kv_heads, 0, head_dim, dtype=dtype, device=device)

        keys = [blank() for _ in range(num_layers)]
        values = [blank() for _ in range(num_layers)]
        return cls(keys, values, torch.zeros(num_layers, 0, dtype=torch.long, device=device))

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[1]

    # --- decode-time writes -----------------------------------------------------------------

    def reserve(self, extra: int = 1) -> None:
        """Make room for `extra` more entries in every row of every layer, and prepare this step's
        appends (one read of the lengths per step, not one per layer)."""
        if self.batch_size:
            shortest, longest = (n.tolist() for n in torch.aminmax(self.lengths, dim=1))
        else:
            shortest = longest = [0] * self.num_layers
        self._spans = [n + 1 for n in longest]  # each layer's longest row after one append
        self._rows = torch.arange(self.batch_size, device=self.lengths.device)
        self._masks: torch.Tensor | None = None  # built where a step reads them (step_masks)
        self._ragged = [lo != hi for lo, hi in zip(shortest, longest)]
        for layer in range(self.num_layers):
            need = longest[layer] + extra if self.batch_size else 0
            cap = self.keys[layer].shape[2]
            if need > cap:
                new_cap = need + max(SLACK, cap // 4)
                self.map_layer(layer, lambda x: _pad_seq(x, new_cap))

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, text_pos: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Write one new entry per row (k, v: (B, H_kv, D)) and return the layer's live view.

        text_pos (B,) int32: the new entries' original positions, recorded where the layer keeps
        positions. Returns keys, values (B, H_kv, S, D) and the key mask (B, S), S = longest row.
        `reserve(1)` must have run this step (it precomputes the row index and every layer's S).
        """
        rows, span = self._rows, self._spans[layer]
        masks = self.step_masks()  # before the first append moves a length
        pos = self.lengths[layer]
        self.keys[layer][rows, :, pos] = k
        self.values[layer][rows, :, pos] = v
        if self.scores is not None:
            self.scores[layer][rows, :, pos] = 0.0
        if self.positions[layer] is not None:
            self.positions[layer][rows, :, pos] = text_pos[:, None]
        pos.add_(1)  # a view of lengths[layer]: the written entries count from here on
        return self.keys[layer][:, :, :span], self.values[layer][:, :, :span], masks[layer, :, :span]

    def step_masks(self) -> torch.Tensor:
        """Every layer's key mask (L, B, S) for this step, in one op: slot < the row's length after
        the append. Built on first use, which comes before the step's appends move the lengths (the
        eager step's first `append`, the compiled step's `op_layout`); the fused C++ step
        (fused_decode.py) reads none and skips the ops."""
        if self._masks is None:
            slots = torch.arange(max(self._spans), device=self.lengths.device)
            self._masks = slots[None, None, :] < (self.lengths + 1)[:, :, None]
        return self._masks

    def step_layout(self) -> tuple[torch.Tensor, list[int], list[bool]]:
        """What `reserve` prepared for this step's appends: the row index (B,), each layer's span
        after the append, and whether its rows differ in length (the masks: `step_masks`)."""
        return self._rows, self._spans, self._ragged

    def ragged(self, layer: int) -> bool:
        """Whether this step's rows of `layer` differ in length, so that attention needs the key
        mask (otherwise every row's entries fill the span and the mask is all True)."""
        return self._ragged[layer]

    def map_layer(self, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace each of `layer`'s buffers (keys, values, and scores / positions where kept; all
        with the sequence on dim 2) by fn(buffer): resizing and row selection touch them all alike."""
        for buffers in (self.keys, self.values, self.scores, self.positions):
            if buffers is not None and buffers[layer] is not None:
                buffers[layer] = fn(buffers[layer])

    # --- rows joining and leaving -------------------------------------------------------------

    def extend(self, other: BatchedKVCache) -> None:
        """Append the rows of `other` (e.g. freshly prefilled requests) to this batch."""
        if self.batch_size == 0:
            self.keys, self.values, self.lengths, self.scores = other.keys, other.values, other.lengths, other.scores
            self.score_rows, self.positions = other.score_rows, other.positions
            return
        if [p is None for p in self.positions] != [p is None for p in other.positions]:
            raise ValueError("cannot join caches that keep positions for different layers")
        if self.scores is not None or other.scores is not None:
            self.score_rows = torch.cat([self.decode_scored_rows(), other.decode_scored_rows()])
        else:
            self.score_rows = None
        if other.scores is not None:
            self.enable_scores()
        for layer in range(self.num_layers):
            cap = max(self.keys[layer].shape[2], other.keys[layer].shape[2])
            self.keys[layer] = torch.cat([_pad_seq(self.keys[layer], cap), _pad_seq(other.keys[layer], cap)])
            self.values[layer] = torch.cat([_pad_seq(self.values[layer], cap), _pad_seq(other.values[layer], cap)])
            if self.scores is not None:
                theirs = other.scores[layer] if other.scores is not None else other.keys[layer].new_zeros(
                    other.keys[layer].shape[:3])
                self.scores[layer] = torch.cat([_pad_seq(self.scores[layer], cap), _pad_seq(theirs, cap)])
            if self.positions[layer] is not None:
                self.positions[layer] = torch.cat([_pad_seq(self.positions[layer], cap),
                                                   _pad_seq(other.positions[layer], cap)])
        self.lengths = torch.cat([self.lengths, other.lengths], dim=1)

    def select(self, rows: list[int]) -> None:
        """Keep only `rows` (in that order) and trim the buffers, so leaving rows free memory."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        self.lengths = self.lengths[:, index]
        if self.score_rows is not None:
            self.score_rows = self.score_rows[index]
        for layer in range(self.num_layers):
            cap = int(self.lengths[layer].max()) + SLACK if rows else 0
            self.map_layer(layer, lambda x: x[:, :, :cap].index_select(0, index))

    def copy_rows(self, rows: list[int]) -> BatchedKVCache:
        """A new cache holding copies of `rows` (this one is left untouched)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.lengths.device)
        copy = BatchedKVCache([k.index_select(0, index) for k in self.keys],
                              [v.index_select(0, index) for v in self.values], self.lengths[:, index].clone(),
                              [None if p is None else p.index_select(0, index) for p in self.positions])
        if self.scores is not None:
            copy.scores = [s.index_select(0, index) for s in self.scores]
            copy.score_rows = None if self.score_rows is None else self.score_rows[index]
        return copy

    def scoring_step(self) -> bool:
        """Whether a decode step adds its attention to the scores: they are kept and some row
        accumulates them (`decode_scored_rows`)."""
        return self.scores is not None and (self.score_rows is None or bool(self.score_rows.any()))

    def decode_scored_rows(self) -> torch.Tensor:
        """(B,) bool: which rows accumulate decode scores (none without scores; all by default)."""
        if self.scores is None:
            return torch.zeros(self.batch_size, dtype=torch.bool, device=self.lengths.device)
        if self.score_rows is None:
            return torch.ones(self.batch_size, dtype=torch.bool, device=self.lengths.device)
        return self.score_rows

    def enable_scores(self) -> None:
        if self.scores is None:
            self.scores = [k.new_zeros(k.shape[:3], dtype=torch.float32) for k in self.keys]

    # --- accounting -----------------------------------------------------------------------------

    def bytes_per_entry(self) -> int:
        k = self.keys[0]
        return 2 * k.shape[1] * k.shape[3] * k.element_size()  # K and V, all KV heads

    def row_tokens(self) -> list[int]:
        """KV entries held by each row, summed over layers."""
        return self.lengths.sum(dim=0).tolist()

    def row_bytes(self) -> list[int]:
        per = self.bytes_per_entry()
        return [n * per for n in self.row_tokens()]


def _pad_seq(x: torch.Tensor, cap: int) -> torch.Tensor:
    """Pad dim 2 (the sequence axis) of x with zeros up to `cap`."""
    if x.shape[2] >= cap:
        return x
    pad = x.new_zeros(*x.shape[:2], cap - x.shape[2], *x.shape[3:])
    return torch.cat([x, pad], dim=2)
