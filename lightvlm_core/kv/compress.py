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
        lengths = cache.lengths.tolist()  # (L, B)
        compacted = False
        for layer in range(cache.num_layers):
            for b, budget in enumerate(budgets):
                if budget and lengths[layer][b] >= budget:
                    self.evicted_total += self._compact(cache, layer, b, budget)
                    compacted = True
        if compacted:
            self._trim(cache)

    def _compact(self, cache: BatchedKVCache, layer: int, b: int, budget: int) -> int:
        """Shrink row b of `layer` to `budget - interval` entries; returns the entries evicted."""
        n = int(cache.lengths[layer, b])
        sinks, window, interval = self.shape_for(budget)
        target = budget - interval
        keys, values, scores = cache.keys[layer], cache.values[layer], cache.scores[layer]
        keep = self.keep_indices(scores[b, :, :n], target, sinks, window)  # (H_kv, target)
        for buf in (keys, values):
            buf[b, :, :target] = buf[b].gather(1, keep[..., None].expand(-1, -1, buf.shape[-1]))
        scores[b, :, :target] = scores[b].gather(1, keep)
        cache.lengths[layer, b] = target
        return (n - target) * keys.shape[1]

    @staticmethod
    def keep_indices(scores: torch.Tensor, keep: int, num_sinks: int, window: int) -> torch.Tensor:
        """scores: (H_kv, n) accumulated attention. Sorted indices to keep per KV head: (H_kv, keep)."""
        h, n = scores.shape
        middle = scores[:, num_sinks : n - window]
        heavy = middle.topk(keep - num_sinks - window, dim=-1).indices + num_sinks
        sinks = torch.arange(num_sinks, device=scores.device).expand(h, -1)
        recent = torch.arange(n - window, n, device=scores.device).expand(h, -1)
        return torch.cat([sinks, heavy, recent], dim=-1).sort(dim=-1).values

    @staticmethod
    def _trim(cache: BatchedKVCache) -> None:
        """Shrink buffers that are now much longer than their longest row (frees memory)."""
        for layer in range(cache.num_layers):
            need = int(cache.lengths[layer].max()) + SLACK
            if cache.keys[layer].shape[2] > 2 * need:
                cache.keys[layer] = cache.keys[layer][:, :, :need].clone()
                cache.values[layer] = cache.values[layer][:, :, :need].clone()
                cache.scores[layer] = cache.scores[layer][:, :, :need].clone()
