"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467): dominant + contextual tokens, pre-LLM.

The paper keeps the "dominant" tokens that receive the most attention in the vision tower, then
merges the remaining ones into a few "contextual" tokens: targets picked uniformly among the
rest, every other remaining token averaged into the target it is most similar to. Default split
of a budget: 54 dominant + 10 contextual out of 64 (contextual share 10/64).

Adaptation: the engine's pre-LLM hook sees the projected image features, not the vision tower's
attention maps, and not every family has a [CLS] token. As the paper does for towers without
[CLS] (SigLIP), dominance is the mean attention each token receives from all tokens; here that
attention is computed from the projected features themselves (softmax(F F^T / sqrt(d))), not
from the tower's learned query/key projections, so it approximates the paper's signal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightvlm_core.reduction.base import PreLLMMethod


@dataclass
class VisionZip(PreLLMMethod):
    keep_ratio: float = 0.1
    contextual_share: float = 10 / 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.contextual_share < 1:
            raise ValueError(f"contextual_share must be in [0, 1), got {self.contextual_share}")

    def reduce(self, feats: torch.Tensor, text: torch.Tensor, target: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = feats.shape
        x = feats.float()
        received = (x @ x.T / d**0.5).softmax(dim=-1).mean(dim=0)  # (N,) attention received
        num_ctx = min(round(target * self.contextual_share), target - 1)
        dominant = received.topk(target - num_ctx).indices
        is_rest = torch.ones(n, dtype=torch.bool, device=feats.device)
        is_rest[dominant] = False
        rest = torch.nonzero(is_rest).flatten()
        if num_ctx == 0 or rest.numel() == 0:
            return dominant, x[dominant].to(feats.dtype), torch.ones(len(dominant), device=feats.device)
        anchors = rest[torch.linspace(0, rest.numel() - 1, num_ctx, device=feats.device).round().long().unique()]
        others = rest[~torch.isin(rest, anchors)]
        unit = F.normalize(x, dim=-1)
        assign = (unit[others] @ unit[anchors].T).argmax(dim=-1)
        counts = torch.ones(len(anchors), device=feats.device).index_add_(0, assign, torch.ones(len(others),
                                                                                                  device=feats.device))
        merged = x[anchors].index_add(0, assign, x[others]) / counts[:, None]
        index = torch.cat([dominant, anchors])
        sizes = torch.cat([torch.ones(len(dominant), device=feats.device), counts])
        return index, torch.cat([x[dominant], merged]).to(feats.dtype), sizes
