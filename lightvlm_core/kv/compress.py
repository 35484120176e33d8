"""Decode-time KV-cache compression (LightVLM §2): sinks + recent window + heavy hitters.

Every row of a batch with a `kv_budget` holds, per layer, at most `budget` entries: the first
`num_sinks` (attention sinks, StreamingLLM arXiv 2309.17453), the last `window` (recent tokens),
and among the rest those that received the most attention so far (H2O, arXiv 2306.14048), the
scores being seeded at prefill by the prompt's last tokens (SnapKV, arXiv 2404.14469). When a
row reaches its budget it is compacted down to `budget - interval`, so compaction runs once
every `interval` steps (amortised) and the budget holds at every step. The buffers shrink, so
memory is really released. Positions are untouched: keys already carry their RoPE rotation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightvlm_core.kv.cache import SLACK, BatchedKVCache


@dataclass
class KVCompressor:
    num_sinks: int = 4
    window: int = 32
    interval: int = 16  # steps between two compactions of a row
    evicted_total: int = 0

    def shape_for(self, budget: int) -> tuple[int, int, int]:
        """(sinks, window, interval) for a budget; small budgets get proportionally smaller parts."""
        sinks = min(self.num_sinks, max(1, budget // 8))
        window = min(self.window, max(1, budget // 4))
        interval = min(self.interval, max(1, budget // 8))
        return sinks, window, interval

    def after_step(self, cache: BatchedKVCache, budgets: list[int | None]) -> None:
        """Compact every (layer, row) whose cache has reached its budget."""
        if cache.scores is None or not any(budgets):
            return
        compacted = False
        for budget in sorted({b for b in budgets if b}):
            in_group = torch.tensor([b == budget for b in budgets], device=cache.lengths.device)
            for layer in range(cache.num_layers):
                rows = torch.nonzero(in_group & (cache.lengths[layer] >= budget)).flatten()
                if rows.numel():
                    self.evicted_total += self._compact(cache, layer, rows, budget)
                    compacted = True
        if compacted:
            self._trim(cache)

    def _compact(self, cache: BatchedKVCache, layer: int, rows: torch.Tensor, budget: int) -> int:
        """Shrink `rows` of `layer` to `budget - interval` entries; returns the entries evicted."""
        sinks, window, interval = self.shape_for(budget)
        target = budget - interval
        lengths = cache.lengths[layer, rows]
        keys, values, scores = cache.keys[layer], cache.values[layer], cache.scores[layer]
        keep = self.keep_indices(scores[rows], lengths, target, sinks, window)  # (R, H_kv, target)
        for buf in (keys, values):
            buf[rows, :, :target] = buf[rows].gather(2, keep[..., None].expand(-1, -1, -1, buf.shape[-1]))
        scores[rows, :, :target] = scores[rows].gather(2, keep)
        cache.lengths[layer, rows] = target
        return int((lengths - target).sum()) * keys.shape[1]

    @staticmethod
    def keep_indices(scores: torch.Tensor, lengths: torch.Tensor, keep: int, num_sinks: int, window: int
                     ) -> torch.Tensor:
        """Sorted indices to keep per row and KV head: (R, H_kv, keep).

        scores: (R, H_kv, S) accumulated attention; lengths: (R,) valid entries per row. The first
        `num_sinks` and the last `window` valid entries always stay; the rest go by score.
        """
        pos = torch.arange(scores.shape[-1], device=scores.device)[None]
        n = lengths[:, None]
        protected = (pos < num_sinks) | ((pos >= n - window) & (pos < n))
        ranked = scores.masked_fill(~(pos < n)[:, None], float("-inf"))
        ranked = ranked.masked_fill(protected[:, None], float("inf"))
        return ranked.topk(keep, dim=-1).indices.sort(dim=-1).values

    @staticmethod
    def _trim(cache: BatchedKVCache) -> None:
        """Shrink buffers that are now much longer than their longest row (frees memory)."""
        for layer in range(cache.num_layers):
            need = int(cache.lengths[layer].max()) + SLACK
            if cache.keys[layer].shape[2] > 2 * need:
                cache.keys[layer] = cache.keys[layer][:, :, :need].clone()
                cache.values[layer] = cache.values[layer][:, :, :need].clone()
                cache.scores[layer] = cache.scores[layer][:, :, :need].clone()
