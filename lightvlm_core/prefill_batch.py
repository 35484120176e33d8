"""A prefill group's prompts as one right-padded batch (`forward.PrefillState`): embeddings,
validity, positions, each token's image span, merge sizes and the adapter's per-token carry.
"""

from __future__ import annotations

import torch

from lightvlm_core import forward
from lightvlm_core.request import Request


def pad_batch(group: list[Request], embeds: list[torch.Tensor], adapter, device: torch.device,
              carry: list[dict[str, torch.Tensor]] | None = None) -> forward.PrefillState:
    """Right-pad the prompts of a group into one PrefillState (with the adapter's per-token carry)."""
    b, t, d = len(group), max(e.shape[0] for e in embeds), embeds[0].shape[-1]
    h = embeds[0].new_zeros(b, t, d)
    valid = torch.zeros(b, t, dtype=torch.bool, device=device)
    pos = torch.zeros((3, b, t) if adapter.uses_mrope else (b, t), dtype=torch.long, device=device)
    span = torch.full((b, t), -1, dtype=torch.long, device=device)
    for row, (r, e) in enumerate(zip(group, embeds)):
        n = e.shape[0]
        h[row, :n] = e
        valid[row, :n] = True
        pos[..., row, :n] = r.prompt.positions.to(device)
        for i, (s, end) in enumerate(r.prompt.image_spans):
            span[row, s:end] = i
    size = torch.ones(b, t, dtype=torch.float32, device=device)
    return forward.PrefillState(h=h, valid=valid, pos=pos, span=span, size=size, carry=pad_carry(carry, t))


def pad_carry(carry: list[dict[str, torch.Tensor]] | None, t: int) -> dict[str, torch.Tensor]:
    """Per-row carry features {name: (T_i, ...)} -> {name: (B, t, ...)}, zero where a row has none."""
    names = sorted({name for row in carry or [] for name in row})
    padded = {}
    for name in names:
        like = next(row[name] for row in carry if name in row)
        out = like.new_zeros(len(carry), t, *like.shape[1:])
        for i, row in enumerate(carry):
            if name in row:
                out[i, : row[name].shape[0]] = row[name]
        padded[name] = out
    return padded
