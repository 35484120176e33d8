"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967): instruction-conditioned DPP, pre-LLM.

The paper keeps the visual tokens that maximise a conditional determinantal point process: the
kernel L = diag(q) S diag(q) combines feature similarity S (cosine) with each token's relevance
q to the instruction, so the kept set is both relevant and diverse; the MAP subset is found with
the fast greedy algorithm (Chen et al., 2018: incremental Cholesky, O(N k^2)).

Adaptation: the paper measures relevance with the CLIP text encoder's embedding of the
instruction. Our families expose no text tower, so relevance is the mean cosine similarity of
each projected image feature to the LLM's input embeddings of the instruction tokens (the text
after the image), min-max normalised, and q = exp(alpha * relevance) with the paper's
theta = 0.5 (alpha = theta / (2 (1 - theta))).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lightvlm_core.reduction.base import PreLLMMethod


@dataclass
class CDPruner(PreLLMMethod):
    keep_ratio: float = 0.1
    theta: float = 0.5  # trade-off between relevance and diversity

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.theta < 1:
            raise ValueError(f"theta must be in [0, 1), got {self.theta}")

    def reduce(self, feats: torch.Tensor, text: torch.Tensor, target: int
               ) -> tuple[torch.Tensor, None, None]:
        unit = F.normalize(feats.float(), dim=-1)
        quality = torch.ones(feats.shape[0], device=feats.device)
        if text.numel():
            relevance = (unit @ F.normalize(text.float(), dim=-1).T).mean(dim=1)
            relevance = (relevance - relevance.min()) / (relevance.max() - relevance.min() + 1e-6)
            quality = torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)
        kernel = quality[:, None] * (unit @ unit.T) * quality[None, :]
        return greedy_dpp_map(kernel, target), None, None


def greedy_dpp_map(kernel: torch.Tensor, target: int) -> torch.Tensor:
    """Fast greedy MAP of a DPP with PSD `kernel` (N, N): indices (target,) in selection order.

    Each step adds the item with the largest marginal gain in log det, tracked as the residual
    variance d_i^2 of an incremental Cholesky factorisation.
    """
    n = kernel.shape[0]
    factors = kernel.new_zeros(target, n)
    gains = kernel.diagonal().clone()
    chosen: list[int] = []
    for step in range(target):
        pick = int(gains.argmax())
        if not gains[pick] > 1e-6:  # the kernel's rank is used up: no set is more diverse
            break
        chosen.append(pick)
        row = (kernel[pick] - factors[:step].T @ factors[:step, pick]) / gains[pick].sqrt()
        factors[step] = row
        gains = (gains - row**2).nan_to_num(nan=-float("inf"))
        gains[chosen] = -float("inf")
    if len(chosen) < target:  # fill up with the highest-quality tokens not taken yet
        rest = kernel.diagonal().clone()
        rest[chosen] = -float("inf")
        chosen += rest.topk(target - len(chosen)).indices.tolist()
    return torch.tensor(chosen, dtype=torch.long, device=kernel.device)
