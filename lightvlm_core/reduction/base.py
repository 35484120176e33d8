"""The two interfaces a token-reduction method implements, and the small helpers they share.

A method is a dataclass whose fields are its hyperparameters (`keep_ratio` for all: the fraction
of each image span's ORIGINAL tokens kept at the end), validated in `__post_init__`.

- `PreLLMMethod.reduce(feats, text, target)` sees one image span's projected features (N, d)
  before the first LLM layer, plus the prompt's text embeddings, and returns which `target`
  tokens stay (and optionally their new, merged features): the LLM never sees the rest.
- `InLLMMethod` cuts between decoder layers: `stages(num_layers)` says before which layers and to
  what fraction; the hook scores tokens by the attention of `query` prompt tokens at the layer
  before each cut, and `choose(scores, h, target)` picks the survivors; `merge` folds the rest
  into them (ToMe-style) instead of dropping them.

The hook (hook.py) does the per-row, per-span bookkeeping, gathering and merging once for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

Stages = tuple[tuple[float, float], ...]


@dataclass
class ReductionMethod:
    keep_ratio: float = 0.5

    where: ClassVar[str] = ""  # "pre" | "in"

    def __post_init__(self) -> None:
        if not 0 < self.keep_ratio <= 1:
            raise ValueError(f"keep_ratio must be in (0, 1], got {self.keep_ratio}")


@dataclass
class PreLLMMethod(ReductionMethod):
    where: ClassVar[str] = "pre"

    def reduce(self, feats: torch.Tensor, text: torch.Tensor, target: int
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Keep `target` of the span's tokens: (indices (target,) into feats, new features of those
        tokens (target, d) or None if unchanged, how many originals each carries (target,) or None)."""
        raise NotImplementedError


@dataclass
class InLLMMethod(ReductionMethod):
    where: ClassVar[str] = "in"
    merge: ClassVar[bool] = False  # fold removed tokens into kept ones (else drop them)
    # prompt tokens whose attention scores image tokens: the last N, "text" (every text token
    # after the image), or 0 (no attention needed)
    query: ClassVar[int | str] = 1

    def stages(self, num_layers: int) -> tuple[tuple[int, float], ...]:
        """(layer index, keep ratio) cuts, layers increasing within [1, num_layers - 1]."""
        raise NotImplementedError

    def choose(self, scores: torch.Tensor, h: torch.Tensor, target: int) -> torch.Tensor:
        """Indices (target,) of the span's tokens to keep, given their scores (n,) and states (n, d)."""
        return scores.topk(target).indices


def span_target(keep: float, original: int) -> int:
    """Tokens an image span of `original` tokens keeps at ratio `keep` (at least one)."""
    return max(1, round(keep * original))


def resolve_layers(stages: Stages, num_layers: int) -> tuple[tuple[int, float], ...]:
    """Fractional layers -> indices in [1, num_layers - 1], strictly increasing (late ones dropped).

    Layer 0 always sees every token: attention scores need one layer to be computed.
    """
    resolved: list[tuple[int, float]] = []
    for layer, keep in stages:
        index = round(layer * num_layers) if layer < 1 else int(layer)
        index = min(max(index, 1), num_layers - 1)
        if resolved and index <= resolved[-1][0]:
            index = resolved[-1][0] + 1
        if index < num_layers:
            resolved.append((index, keep))
    if resolved and len(resolved) < len(stages):  # a shallow model: the last cut still ends at the final keep
        resolved[-1] = (resolved[-1][0], stages[-1][1])
    return tuple(resolved)


def check_stages(stages: Stages) -> None:
    """ValueError unless layers increase and keep ratios are in (0, 1] and do not increase."""
    if not stages:
        raise ValueError("schedule needs at least one (layer, keep) stage")
    last_layer, last_keep = -1.0, 1.0
    for stage in stages:
        if len(stage) != 2:
            raise ValueError(f"schedule stage {stage!r} must be (layer, keep_ratio)")
        layer, keep = stage
        if layer <= last_layer or layer < 0:
            raise ValueError("schedule layers must increase and be >= 0")
        if not 0 < keep <= last_keep:
            raise ValueError("schedule keep ratios must be in (0, 1] and not increase")
        last_layer, last_keep = layer, keep
