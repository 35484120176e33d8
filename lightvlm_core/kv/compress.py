"""Decode-time KV-cache compression (LightVLM §2): sinks + recent window + heavy hitters.

Every row of a batch with a `kv_budget` keeps, per layer, at most `budget` entries: the first
`num_sinks` (attention sinks, StreamingLLM arXiv 2309.17453), the last `window` (recent tokens),
and among the rest those that received the most attention from decode queries so far (H2O,
arXiv 2306.14048). Compaction runs when a row exceeds its budget by `slack` entries, so its cost
is amortised over `slack` steps; rows are compacted in place and the buffers shrink, so memory
is really released. Positions are untouched: keys already carry their RoPE rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightvlm_core.kv.cache import SLACK, BatchedKVCache


@dataclass
class KVCompressor:
    num_sinks: int = 4
    window: int = 32
    slack: int = 16  # compact every `slack` steps past the budget
    evicted_total: int = 0

    def after_step(self, cache: BatchedKVCache, budgets: list[int | None]) -> None:
        """Compact the rows whose cache has grown `slack` entries past their budget."""
        if cache.scores is None or not any(budgets):
            return
        lengths = cache.lengths.tolist()  # (L, B)
        for layer in range(cache.num_layers):
            rows = [b for b, budget in enumerate(budgets)
                    if budget and lengths[layer][b] >= budget + self.slack]
            if rows:
                self.evicted_total += self._compact_layer(cache, layer, rows, budgets)
        self._trim(cache)

    def _compact_layer(self, cache: BatchedKVCache, layer: int, rows: list[int], budgets: list[int | None]) -> int:
        evicted = 0
        keys, values, scores = cache.keys[layer], cache.values[layer], cache.scores[layer]
        for b in rows:
            n = int(cache.lengths[layer, b])
            budget = max(budgets[b], self.num_sinks + self.window)
            keep = self.keep_indices(scores[b, :, :n], budget)  # (H_kv, budget)
            m = keep.shape[1]
            for buf in (keys, values):
                buf[b, :, :m] = buf[b].gather(1, keep[..., None].expand(-1, -1, buf.shape[-1]))
            scores[b, :, :m] = scores[b].gather(1, keep)
            cache.lengths[layer, b] = m
            evicted += (n - m) * keys.shape[1]
        return evicted

    def keep_indices(self, scores: torch.Tensor, budget: int) -> torch.Tensor:
        """scores: (H_kv, n) accumulated attention. Sorted indices to keep per KV head: (H_kv, budget)."""
        h, n = scores.shape
        middle = scores[:, self.num_sinks : n - self.window]
        n_heavy = budget - self.num_sinks - self.window
        heavy = middle.topk(n_heavy, dim=-1).indices + self.num_sinks
        sinks = torch.arange(self.num_sinks, device=scores.device).expand(h, -1)
        recent = torch.arange(n - self.window, n, device=scores.device).expand(h, -1)
        return torch.cat([sinks, heavy, recent], dim=-1).sort(dim=-1).values

    @staticmethod
    def _trim(cache: BatchedKVCache) -> None:
        """Shrink buffers that are now much longer than their longest row."""
        for layer in range(cache.num_layers):
            need = int(cache.lengths[layer].max()) + SLACK
            if cache.keys[layer].shape[2] > 2 * need:
                cache.keys[layer] = cache.keys[layer][:, :, :need].clone()
                cache.values[layer] = cache.values[layer][:, :, :need].clone()
                cache.scores[layer] = cache.scores[layer][:, :, :need].clone()
