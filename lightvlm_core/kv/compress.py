"""Decode-time KV-cache compression (LightVLM §2), with the eviction policy chosen per request.

Every row with a `kv_budget` holds, per layer, at most `policy.layer_budget(budget, layer)`
entries. When a (layer, row) reaches its budget it is compacted down to `budget - interval`, so
compaction runs once every `interval` steps (amortised) and the budget holds at every step; the
policy (kv/registry.py) decides which entries stay. The buffers shrink, so memory is really
released. Keys already carry their RoPE rotation; the original positions that sliding-window
layers record are gathered with their entries, so a window stays measured in positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lightvlm_core.kv.cache import SLACK, BatchedKVCache
from lightvlm_core.kv.policy import KVPolicy
from lightvlm_core.kv.registry import kv_policy


def needs_prefill_scores(budgets: list[int | None], policies: list[str | None]) -> bool:
    """Whether a prefill group must compute the SnapKV-style seed scores."""
    return any(b and kv_policy(p).needs_prefill_scores for b, p in zip(budgets, policies))


def mark_decode_scoring(cache: BatchedKVCache, budgets: list[int | None], policies: list[str | None]) -> None:
    """Tell decode which rows of a freshly prefilled cache accumulate attention scores."""
    if cache.scores is not None:
        flags = [bool(b) and kv_policy(p).needs_decode_scores for b, p in zip(budgets, policies)]
        cache.score_rows = torch.tensor(flags, device=cache.lengths.device)


@dataclass
class KVCompressor:
    evicted_total: int = 0

    @torch.inference_mode()  # the cache's tensors are made in inference mode (forward.py)
    def after_step(self, cache: BatchedKVCache, budgets: list[int | None],
                   policies: list[str | None] | None = None) -> None:
        """Compact every (layer, row) whose cache has reached its policy's budget for that layer."""
        if not any(budgets):
            return
        policies = policies or [None] * len(budgets)
        compacted = False
        for budget, name in sorted({(b, p or "") for b, p in zip(budgets, policies) if b}):
            policy = kv_policy(name or None)
            in_group = torch.tensor([b == budget and (p or "") == name for b, p in zip(budgets, policies)],
                                    device=cache.lengths.device)
            for layer in range(cache.num_layers):
                limit = policy.layer_budget(budget, layer, cache.num_layers)
                rows = torch.nonzero(in_group & (cache.lengths[layer] >= limit)).flatten()
                if rows.numel():
                    self.evicted_total += self._compact(cache, layer, rows, limit, policy)
                    compacted = True
        if compacted:
            _trim(cache)

    def _compact(self, cache: BatchedKVCache, layer: int, rows: torch.Tensor, budget: int,
                 policy: KVPolicy) -> int:
        """Shrink `rows` of `layer` to `budget - interval` entries; returns the entries evicted."""
        sinks, window, interval = policy.shape_for(budget)
        target = budget - interval
        lengths = cache.lengths[layer, rows]
        keys, values = cache.keys[layer], cache.values[layer]
        scores = cache.scores[layer][rows] if cache.scores is not None else keys.new_zeros(
            len(rows), keys.shape[1], keys.shape[2], dtype=torch.float32)
        keep = policy.keep_indices(scores, lengths, target, sinks, window)  # (R, H_kv, target)
        for buf in (keys, values):
            buf[rows, :, :target] = buf[rows].gather(2, keep[..., None].expand(-1, -1, -1, buf.shape[-1]))
        if cache.scores is not None:
            cache.scores[layer][rows, :, :target] = scores.gather(2, keep)
        positions = cache.positions[layer]
        if positions is not None:
            positions[rows, :, :target] = positions[rows].gather(2, keep)
        cache.lengths[layer, rows] = target
        return int((lengths - target).sum()) * keys.shape[1]

    @staticmethod
    def keep_indices(scores: torch.Tensor, lengths: torch.Tensor, keep: int, num_sinks: int, window: int
                     ) -> torch.Tensor:
        """The default policy's selection (kept for callers of the former API)."""
        return kv_policy(None).keep_indices(scores, lengths, keep, num_sinks, window)


def _trim(cache: BatchedKVCache) -> None:
    """Shrink buffers that are now much longer than their longest row (frees memory)."""
    for layer in range(cache.num_layers):
        need = int(cache.lengths[layer].max()) + SLACK
        if cache.keys[layer].shape[2] > 2 * need:
            cache.map_layer(layer, lambda x: x[:, :, :need].clone())
