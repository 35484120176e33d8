"""Random: the same budget as FastV (one cut at layer 2), tokens chosen uniformly at random.

The draw is seeded by the span's own size and budget, so a row gives the same result alone or in
any batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lightvlm_core.reduction.base import InLLMMethod


@dataclass
class RandomDrop(InLLMMethod):
    keep_ratio: float = 0.5
    layer: int = 2
    seed: int = 0

    query: ClassVar[int | str] = 0  # no attention needed

    def stages(self, num_layers: int) -> tuple[tuple[int, float], ...]:
        return ((min(max(self.layer, 1), num_layers - 1), self.keep_ratio),)

    def choose(self, scores: torch.Tensor, h: torch.Tensor, target: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + scores.numel() * 1009 + target)
        return torch.randperm(scores.numel(), generator=gen)[:target].to(scores.device)
