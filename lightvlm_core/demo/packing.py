"""Shared-image-prefix packing: one sequence per image, ~8 question/answer segments after it.

A 4D boolean mask lets each segment see the image prefix and itself (causally); position ids
restart after the prefix for each segment, so a segment is computed exactly as the stand-alone
prompt ``<s> <|user|> <image>*256 q <|assistant|>`` would be.
"""

from __future__ import annotations

import torch

from .processor import ASSISTANT_ID, BOS_ID, EOS_ID, IMAGE_ID, IMAGE_SEQ_LEN, PAD_ID, USER_ID, encode_words

PREFIX_LEN = 2 + IMAGE_SEQ_LEN  # <s> <|user|> <image>*256


def segment(q: str, a: str):
    """(ids, n_question_tokens) for ``q <|assistant|> a </s>``."""
    qi = encode_words(q)
    ai = encode_words(a)
    return qi + [ASSISTANT_ID] + ai + [EOS_ID], len(qi)


def pack(examples_qas: list[list[tuple]]):
    """Pack per-image question lists into shared-prefix sequences.

    Returns input ids (B, L), position ids, 4D bool mask (B, 1, L, L), the supervised
    (batch, position, target, segment-id) index tensors and the number of segments.
    """
    seqs, poss, segs, sup, n_seg = _layout(examples_qas)
    ids_t, pos_t, seg_t = _pad(seqs, poss, segs)
    L = ids_t.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    si = seg_t[:, :, None]
    sj = seg_t[:, None, :]
    allowed = ((sj == 0) | (si == sj)) & (si >= 0) & (sj >= 0)
    mask = causal[None] & allowed
    mask |= torch.eye(L, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    return (ids_t, pos_t, mask[:, None], *(torch.tensor(s) for s in sup), n_seg)


def _layout(examples_qas: list[list[tuple]]):
    """Per-image token, position and segment lists, and the supervised (b, p, target, seg) lists."""
    seqs, poss, segs = [], [], []
    sup_b, sup_p, sup_t, sup_seg = [], [], [], []
    seg_counter = 0
    for b, qas in enumerate(examples_qas):
        ids = [BOS_ID, USER_ID] + [IMAGE_ID] * IMAGE_SEQ_LEN
        pos = list(range(PREFIX_LEN))
        seg = [0] * PREFIX_LEN
        for j, (q, a) in enumerate(qas):
            sid, nq = segment(q, a)
            start = len(ids)
            ids += sid
            pos += list(range(PREFIX_LEN, PREFIX_LEN + len(sid)))
            seg += [j + 1] * len(sid)
            # position of <|assistant|> predicts the first answer token, ..., last answer token predicts </s>
            for t in range(nq, len(sid) - 1):
                sup_b.append(b)
                sup_p.append(start + t)
                sup_t.append(sid[t + 1])
                sup_seg.append(seg_counter)
            seg_counter += 1
        seqs.append(ids)
        poss.append(pos)
        segs.append(seg)
    return seqs, poss, segs, (sup_b, sup_p, sup_t, sup_seg), seg_counter


def _pad(seqs, poss, segs):
    """(B, L) id, position and segment tensors; padding is PAD_ID / 0 / segment -1."""
    B, L = len(seqs), max(len(s) for s in seqs)
    ids_t = torch.full((B, L), PAD_ID, dtype=torch.long)
    pos_t = torch.zeros((B, L), dtype=torch.long)
    seg_t = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        n = len(seqs[b])
        ids_t[b, :n] = torch.tensor(seqs[b])
        pos_t[b, :n] = torch.tensor(poss[b])
        seg_t[b, :n] = torch.tensor(segs[b])
    return ids_t, pos_t, seg_t
