"""PyramidKV (Cai et al., arXiv 2406.02069): SnapKV selection with budgets that shrink with depth.

Lower layers attend broadly and get more entries, upper layers attend to few and get fewer: the
per-layer budgets form an arithmetic sequence whose mean is the request's budget and whose top
layer gets budget / beta (the paper's beta = 20), floored at `min_budget` entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightvlm_core.kv.snapkv import SnapKV


@dataclass(frozen=True)
class PyramidKV(SnapKV):
    beta: float = 20.0
    min_budget: int = 8

    name: ClassVar[str] = "pyramidkv"

    def layer_budget(self, budget: int, layer: int, num_layers: int) -> int:
        if num_layers < 2:
            return budget
        top = max(self.min_budget, min(budget, round(budget / self.beta)))
        bottom = 2 * budget - top
        return round(bottom + (top - bottom) * layer / (num_layers - 1))
