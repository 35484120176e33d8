"""Training-only auxiliary heads (never exported): dense per-patch and global targets on the
projected image tokens, and an optional LLM-side head on an intermediate hidden state."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import scenes as S
from .data import N_PRESENCE

AUX_SPEC = [  # name, classes (per patch)
    ("color", 6), ("shape", 4), ("rank", 5), ("centre", 2),
]
GLOBAL_SPEC = [("n_circle", 5), ("n_square", 5), ("n_triangle", 5), ("n_total", 5)]

# Targets of the LLM-side auxiliary head, read at every supervised position (the
# <|assistant|> token and the answer tokens) from the hidden state after
# ``llm_aux_layer`` decoder layers.  Question-side targets (what is asked) and
# image-side targets (what the image contains) are each learnable on their own, which
# breaks the saddle where the answer depends only on their interaction.
LLM_Q_SPEC = [("q_type", 5), ("q_color", 6), ("q_shape", 4), ("q_cs", 16)]
LLM_I_SPEC = ([("n_circle", 5), ("n_square", 5), ("n_triangle", 5), ("n_total", 5)]
              + [(f"color_of_{s}", 6) for s in S.SHAPES] + [(f"shape_of_{c}", 4) for c in S.COLOR_NAMES]
              + [(f"rank{k}_color", 6) for k in range(4)] + [(f"rank{k}_shape", 4) for k in range(4)])


class AuxHeads(nn.Module):
    """Training-only linear heads on the projected image tokens (not exported)."""

    def __init__(self, dim: int):
        super().__init__()
        self.local = nn.Linear(dim, sum(c for _, c in AUX_SPEC))
        self.glob = nn.Linear(dim, sum(c for _, c in GLOBAL_SPEC) + N_PRESENCE)

    def loss(self, tok: torch.Tensor, lab: dict, gw: float = 1.0) -> torch.Tensor:
        """``gw`` weights the non-local targets (rank and the global heads)."""
        # tok: (B, 256, D)
        out = self.local(tok)
        total = 0.0
        o = 0
        for name, c in AUX_SPEC:
            lg = out[..., o:o + c].reshape(-1, c)
            tgt = lab[name].reshape(-1)
            if name == "centre":
                total = total + F.cross_entropy(lg, tgt, weight=torch.tensor([1.0, 10.0]))
            elif name == "rank":
                total = total + gw * F.cross_entropy(lg, tgt)
            else:
                total = total + F.cross_entropy(lg, tgt)
            o += c
        g = self.glob(tok)  # every patch predicts the global targets
        o = 0
        for name, c in GLOBAL_SPEC:
            lg = g[..., o:o + c]
            tgt = lab[name][:, None].expand(-1, lg.shape[1])
            total = total + 0.5 * gw * F.cross_entropy(lg.reshape(-1, c), tgt.reshape(-1))
            o += c
        pres = g[..., o:]
        total = total + 0.5 * gw * F.binary_cross_entropy_with_logits(
            pres, lab["presence"][:, None, :].expand_as(pres))
        return total


@torch.no_grad()
def aux_metrics(aux: AuxHeads, tok: torch.Tensor, lab: dict) -> dict:
    """Foreground accuracy of the per-patch heads and accuracy of the global heads."""
    out = aux.local(tok)
    r = {}
    o = 0
    for name, c in AUX_SPEC:
        pred = out[..., o:o + c].argmax(-1)
        fg = lab[name] > 0
        r["a_" + name] = round((pred[fg] == lab[name][fg]).float().mean().item(), 3)
        o += c
    g = aux.glob(tok)
    o = 0
    for name, c in GLOBAL_SPEC:
        pred = g[..., o:o + c].argmax(-1)
        r["a_" + name] = round((pred == lab[name][:, None]).float().mean().item(), 3)
        o += c
    return r


class LLMAuxHead(nn.Module):
    """Training-only linear head on an intermediate LLM hidden state (not exported)."""

    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(dim, sum(c for _, c in LLM_Q_SPEC + LLM_I_SPEC) + N_PRESENCE)

    def loss(self, h: torch.Tensor, qtgt: dict, itgt: dict, presence: torch.Tensor):
        """h: (N, D) at supervised positions; qtgt[name]: (N,); itgt[name] / presence: (N, ...)."""
        out = self.lin(h)
        terms = []
        o = 0
        for name, c in LLM_Q_SPEC + LLM_I_SPEC:
            tgt = qtgt[name] if name in qtgt else itgt[name]
            terms.append(F.cross_entropy(out[:, o:o + c], tgt))
            o += c
        terms.append(F.binary_cross_entropy_with_logits(out[:, o:], presence) * 3.0)
        return torch.stack(terms).mean()
