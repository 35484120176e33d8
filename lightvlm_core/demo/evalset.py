"""The held-out monitor set a training run evaluates on (teacher-forced exact match per question)."""

from __future__ import annotations

import numpy as np
import torch

from . import scenes as S
from .data import to_pixels
from .model import packed_forward
from .packing import pack


def segment_exact_match(logits, sup_t, sup_seg, n_seg):
    """(n_seg,) bool: every supervised token of the segment is the argmax (== greedy exact match)."""
    ok = (logits.argmax(-1) == sup_t).float()
    wrong = torch.zeros(n_seg).index_add_(0, sup_seg, 1.0 - ok)
    return wrong == 0


class EvalSet:
    """Fixed held-out monitor set: ``n`` questions (5 per scene), packed per scene."""

    def __init__(self, n: int, seed: int):
        items = list(S.heldout_questions(n, seed))
        self.groups = []  # (pixels, [(q, a, qtype)])
        last = None
        for img, q, a, qt in items:
            if last is None or img is not last:
                self.groups.append((to_pixels(img), []))
                last = img
            self.groups[-1][1].append((q, a, qt))

    @torch.no_grad()
    def run(self, model, bs: int = 25) -> dict:
        """Exact-match accuracy per question type and overall, rounded to 4 places."""
        model.eval()
        res = {qt: [] for qt in S.QTYPES}
        for i in range(0, len(self.groups), bs):
            grp = self.groups[i:i + bs]
            pix = torch.from_numpy(np.stack([g[0] for g in grp]))
            ids, pos, mask, sb, sp, st, sseg, nseg = pack([[(q, a) for q, a, _ in g[1]] for g in grp])
            logits, _ = packed_forward(model, pix, ids, pos, mask, sb, sp)
            em = segment_exact_match(logits, st, sseg, nseg).tolist()
            qts = [qt for g in grp for _, _, qt in g[1]]
            for qt, e in zip(qts, em):
                res[qt].append(e)
        model.train()
        out = {qt: round(sum(v) / max(1, len(v)), 4) for qt, v in res.items()}
        out["overall"] = round(sum(sum(v) for v in res.values()) / sum(len(v) for v in res.values()), 4)
        return out
