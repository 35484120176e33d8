"""PyramidDrop (Xing et al., arXiv 2410.17247): drop image tokens in stages along the LLM.

The paper splits the LLM into S=4 stages of equal depth; at the end of each of the first S-1
stages it keeps a fraction lambda (default 0.5) of the image tokens, ranked by the attention of
the last instruction token at that layer, and drops the rest. Here lambda follows from the
requested final `keep_ratio` (lambda = keep_ratio ** (1 / (S - 1))), so that every method in the
table ends at the same final fraction; the cuts are at 1/4, 2/4 and 3/4 of depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightvlm_core.reduction.base import InLLMMethod, resolve_layers


@dataclass
class PyramidDrop(InLLMMethod):
    keep_ratio: float = 0.125  # lambda = 0.5 at each of the three cuts
    num_stages: int = 4

    query: ClassVar[int | str] = 1  # the last instruction token

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_stages < 2:
            raise ValueError(f"num_stages must be >= 2, got {self.num_stages}")

    def stages(self, num_layers: int) -> tuple[tuple[int, float], ...]:
        cuts = self.num_stages - 1
        lam = self.keep_ratio ** (1 / cuts)
        return resolve_layers(tuple(((i + 1) / self.num_stages, lam ** (i + 1)) for i in range(cuts)), num_layers)
