"""The interface of a KV eviction policy, and the selection every policy shares.

A policy decides, for one (layer, row) whose cache reached its budget, which entries stay. The
first `sinks` and the last `window` valid entries always stay (StreamingLLM's attention sinks and
a recent window); the rest are ranked by `rank(scores, lengths)`, highest kept. A policy declares
which scores it reads, so that none pays for scores it never uses: `needs_prefill_scores` (the
attention the prompt's last tokens pay to each entry, computed once at prefill) and
`needs_decode_scores` (attention accumulated from every decode query, which forces the explicit
softmax path in decode). `layer_budget` lets budgets differ per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class KVPolicy:
    num_sinks: int = 4
    window: int = 32
    interval: int = 16  # steps between two compactions of a row

    name: ClassVar[str] = ""
    needs_prefill_scores: ClassVar[bool] = False
    needs_decode_scores: ClassVar[bool] = False

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int:
        """Entries layer `layer` may hold for a request budget of `budget` (per layer, on average)."""
        return budget

    def shape_for(self, budget: int) -> tuple[int, int, int]:
        """(sinks, window, interval) for a budget; small budgets get proportionally smaller parts."""
        sinks = min(self.num_sinks, max(1, budget // 8))
        window = min(self.window, max(1, budget // 4))
        interval = min(self.interval, max(1, budget // 8))
        return sinks, window, interval

    def rank(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Ranking of the entries (R, H_kv, S): higher stays. Default: the scores themselves."""
        return scores

    def keep_indices(self, scores: torch.Tensor, lengths: torch.Tensor, keep: int, num_sinks: int,
                     window: int) -> torch.Tensor:
        """Sorted indices to keep per row and KV head: (R, H_kv, keep).

        scores: (R, H_kv, S); lengths: (R,) valid entries per row. Sinks and window always stay,
        padding (beyond a row's length) never does.
        """
        pos = torch.arange(scores.shape[-1], device=scores.device)[None]
        n = lengths[:, None]
        protected = (pos < num_sinks) | ((pos >= n - window) & (pos < n))
        ranked = self.rank(scores, lengths).float()
        ranked = ranked.masked_fill(~(pos < n)[:, None], float("-inf"))
        ranked = ranked.masked_fill(protected[:, None], float("inf"))
        # ties (e.g. unscored entries) go to the more recent entry, whatever the buffer's capacity,
        # so that a row keeps the same entries alone or in a batch
        order = ranked.flip(-1).sort(dim=-1, descending=True, stable=True).indices[..., :keep]
        return (scores.shape[-1] - 1 - order).sort(dim=-1).values
