"""Heavy hitters (H2O, Zhang et al., arXiv 2306.14048), seeded at prefill (the default policy).

Beyond sinks and the recent window, keep the entries that received the most attention so far:
the prompt's last tokens' attention at prefill (SnapKV-style seed) plus every decode query's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from lightvlm_core.kv.policy import KVPolicy


@dataclass(frozen=True)
class HeavyHitter(KVPolicy):
    name: ClassVar[str] = "heavy_hitter"
    needs_prefill_scores: ClassVar[bool] = True
    needs_decode_scores: ClassVar[bool] = True
