"""LightVLM pyramid token merging (Hu et al., arXiv 2509.00419; see design/METHOD.md §1).

Stages cut image tokens between decoder layers to a decreasing fraction of the original count;
importance is the attention that prompt tokens pay to each image token at the layer before the
cut; the kept tokens are chosen greedily by importance x novelty (a token much like one already
kept is worth little, so the budget spreads over distinct content: every object of a scene);
every removed token is folded into the kept token it is most similar to (a size x importance
weighted average, sizes carried across stages, ToMe-style) instead of being dropped.
The default schedule depends on the final keep ratio (the named presets' shapes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from lightvlm_core.reduction.base import InLLMMethod, Stages, check_stages, resolve_layers
from lightvlm_core.reduction.registry import PRESET_STAGES


def default_shape(keep_ratio: float) -> Stages:
    """The preset shape whose final keep is closest (in log scale) to `keep_ratio`, rescaled to it."""
    import math

    name = min(PRESET_STAGES, key=lambda n: abs(math.log(PRESET_STAGES[n][-1][1] / keep_ratio)))
    stages = PRESET_STAGES[name]
    scale = keep_ratio / stages[-1][1]
    return tuple((layer, min(1.0, keep * scale)) for layer, keep in stages)


@dataclass
class LightVLM(InLLMMethod):
    keep_ratio: float = 0.1
    schedule: Stages | None = None  # (layer, keep) stages; None: the preset shape for keep_ratio
    query: int | str = 8  # the last 8 prompt tokens (the instruction suffix), or "text"
    # "diverse": importance x novelty, greedy (chosen on the validation split: describe at 3% went
    # from 84% to 95%, see README); "topk": by importance alone, as the first version did
    select: str = "diverse"
    merge_by: str = "size_importance"  # merge weights: "size_importance" or "size"

    merge: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.schedule is not None:
            check_stages(self.schedule)
        if self.select not in ("topk", "diverse") or self.merge_by not in ("size_importance", "size"):
            raise ValueError(f"unknown select {self.select!r} or merge_by {self.merge_by!r}")

    def stages(self, num_layers: int) -> tuple[tuple[int, float], ...]:
        if self.schedule is None:
            return resolve_layers(default_shape(self.keep_ratio), num_layers)
        scale = self.keep_ratio / self.schedule[-1][1]
        return resolve_layers(tuple((layer, min(1.0, keep * scale)) for layer, keep in self.schedule), num_layers)

    def choose(self, scores: torch.Tensor, h: torch.Tensor, target: int) -> torch.Tensor:
        if self.select == "topk":
            return scores.topk(target).indices
        return diverse_topk(scores, h, target)


# the greedy loop of `diverse_topk` in C++ (kernels/diverse_topk.cpp, built by cpu_kernels.py)
_LIBRARY = torch.library.Library("lightvlm", "FRAGMENT")
_LIBRARY.define("diverse_topk(Tensor distinct, Tensor weight, int target) -> Tensor")


def diverse_topk(scores: torch.Tensor, h: torch.Tensor, target: int) -> torch.Tensor:
    """Greedy: repeatedly take the token maximising importance x (1 - its max cosine to those taken).

    The first pick is the most important token; a token nearly identical to one already kept
    scores ~0, so the budget spreads over distinct content (e.g. every object of a scene).
    The cosines come from one matrix product; the loop (one pick per iteration, inherently
    sequential) runs in our C++ kernel where it is built, else in NumPy on the CPU, where an op
    on a few hundred floats costs ~1 us against ~5 us for a torch op (111 picks took 6.6 ms as
    torch ops, most of a bundled-model `aggressive` prefill's reduction time). Both pick the same.
    """
    unit = F.normalize(h.float(), dim=-1)
    distinct = (1 - unit @ unit.T).clamp(min=0).cpu()  # (T, T): 1 - cosine, floored at 0
    weight = (scores.float().clamp(min=0) + 1e-9).cpu()
    if _greedy_kernel_ready():
        chosen = torch.ops.lightvlm.diverse_topk(distinct, weight, target)
    else:
        chosen = torch.tensor(greedy_picks(distinct.numpy(), weight.numpy(), target), dtype=torch.long)
    return chosen.to(scores.device)


def greedy_picks(distinct: np.ndarray, weight: np.ndarray, target: int) -> list[int]:
    """The greedy loop in NumPy: `target` picks of the highest weight x novelty."""
    novelty = np.ones_like(weight)
    taken = np.zeros_like(weight)  # -inf once taken: never picked again (every other gain is >= 0)
    gain = np.empty_like(weight)
    chosen = []
    for _ in range(target):
        np.multiply(weight, novelty, out=gain)
        gain += taken
        pick = int(gain.argmax())
        chosen.append(pick)
        taken[pick] = -np.inf
        np.minimum(novelty, distinct[pick], out=novelty)
    return chosen


@functools.cache
def _greedy_kernel_ready() -> bool:
    """Our C++ kernels are on (LIGHTVLM_ATTENTION_KERNEL) and built here."""
    from lightvlm_core.compiling import attention_kernel_enabled
    from lightvlm_core.cpu_kernels import kernels_built

    return attention_kernel_enabled() and kernels_built()
