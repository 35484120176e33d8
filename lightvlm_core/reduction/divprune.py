"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): keep a maximally diverse subset, pre-LLM.

Token selection is cast as a max-min diversity problem over the projected visual features
(distance = 1 - cosine similarity) and solved greedily: start from the most isolated token, then
repeatedly add the token whose nearest already-kept token is farthest. Training-free, no
attention, no instruction. The rest is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightvlm_core.reduction.base import PreLLMMethod


@dataclass
class DivPrune(PreLLMMethod):
    keep_ratio: float = 0.1

    def reduce(self, feats: torch.Tensor, text: torch.Tensor, target: int
               ) -> tuple[torch.Tensor, None, None]:
        return max_min_diverse(feats, target), None, None


def max_min_diverse(feats: torch.Tensor, target: int) -> torch.Tensor:
    """Greedy max-min diversity: indices (target,) in selection order."""
    unit = F.normalize(feats.float(), dim=-1)
    dist = 1 - unit @ unit.T  # (N, N)
    dist.fill_diagonal_(float("inf"))
    first = int(dist.min(dim=1).values.argmax())  # the most isolated token
    chosen = [first]
    nearest = dist[first].clone()  # distance of every token to its nearest chosen one
    nearest[first] = -1.0
    for _ in range(target - 1):
        pick = int(nearest.argmax())
        chosen.append(pick)
        nearest = torch.minimum(nearest, dist[pick])
        nearest[chosen] = -1.0
    return torch.tensor(chosen, dtype=torch.long, device=feats.device)
