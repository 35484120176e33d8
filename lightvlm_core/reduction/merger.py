"""ToMe-style merging: fold removed tokens into the kept token each is most similar to.

Used by LightVLM (every stage) and any method whose `merge` is set; sizes (originals carried)
add up across stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightvlm_core.forward import PrefillState


def merge_into(state: PrefillState, row: int, src: torch.Tensor, dst: torch.Tensor,
               importance: torch.Tensor) -> None:
    """Merge tokens `src` of `row` into their most similar tokens among `dst` (in place).

    Each destination becomes the weighted average of itself and the tokens assigned to it, with
    weight = size x importance (so a token standing for many originals, or an important one,
    dominates); its size becomes the sum of the sizes. Computed in float32. Per-token carry
    features (Qwen3-VL DeepStack) are averaged with the same weights, so they stay with the tokens.
    """
    h = state.h[row]
    sim = F.normalize(h[src].float(), dim=-1) @ F.normalize(h[dst].float(), dim=-1).T
    target = sim.argmax(dim=-1)  # (n_src,) index into dst
    size = state.size[row]
    weight = size * (importance.float() + 1e-6)
    w_src, w_dst = weight[src], weight[dst]
    total = w_dst.clone().index_add_(0, target, w_src)
    summed = (h[dst].float() * w_dst[:, None]).index_add_(0, target, h[src].float() * w_src[:, None])
    h[dst] = (summed / total[:, None]).to(h.dtype)
    for feats in state.carry.values():
        x = feats[row].flatten(1)  # (T, F) view of (T, ...)
        merged = (x[dst].float() * w_dst[:, None]).index_add_(0, target, x[src].float() * w_src[:, None])
        x[dst] = (merged / total[:, None]).to(x.dtype)
    size[dst] = size[dst].index_add(0, target, size[src])
