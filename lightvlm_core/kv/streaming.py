"""StreamingLLM (Xiao et al., arXiv 2309.17453): attention sinks + the most recent entries.

No scores at all: beyond the first `num_sinks` entries, a row keeps the latest entries that fit
its budget, so decode runs the fused attention path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from lightvlm_core.kv.policy import KVPolicy


@dataclass(frozen=True)
class Streaming(KVPolicy):
    name: ClassVar[str] = "streaming"

    def rank(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(scores.shape[-1], device=scores.device, dtype=torch.float32)
        return pos.expand(scores.shape)  # the most recent stay
