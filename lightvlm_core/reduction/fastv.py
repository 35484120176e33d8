"""FastV (Chen et al., arXiv 2403.06764): one cut after layer K by the last token's attention, drop.

The paper ranks image tokens by the attention they receive at layer K-1 and discards the lowest
R% before layer K (defaults K=2, R=50%); the removed tokens are simply dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightvlm_core.reduction.base import InLLMMethod


@dataclass
class FastV(InLLMMethod):
    keep_ratio: float = 0.5
    layer: int = 2  # K: the first layer that sees the reduced set

    query: ClassVar[int | str] = 1  # the last prompt token

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer < 1:
            raise ValueError(f"layer must be >= 1, got {self.layer}")

    def stages(self, num_layers: int) -> tuple[tuple[int, float], ...]:
        return ((min(self.layer, num_layers - 1), self.keep_ratio),)
