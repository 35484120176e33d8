"""SnapKV (Li et al., arXiv 2404.14469): the prompt compressed from an observation window.

The attention that the prompt's last tokens (the observation window) pay to each entry, pooled
over neighbouring positions (max-pool, kernel 7) so that kept entries bring their context, picks
the prompt entries to keep. No decode-time scores: generated entries get no score, so beyond the
recent window the budget goes to the prompt entries the window chose.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from lightvlm_core.kv.policy import KVPolicy


@dataclass(frozen=True)
class SnapKV(KVPolicy):
    pool_kernel: int = 7

    name: ClassVar[str] = "snapkv"
    needs_prefill_scores: ClassVar[bool] = True

    def rank(self, scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        r, h, s = scores.shape
        pooled = F.max_pool1d(scores.float().reshape(r * h, 1, s), self.pool_kernel, stride=1,
                              padding=self.pool_kernel // 2)
        return pooled.reshape(r, h, s)
