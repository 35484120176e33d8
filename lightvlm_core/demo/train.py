"""Train the tiny shapes-demo LLaVA from scratch on CPU.

    python -m lightvlm_core.demo.train --out runs/demo --export models/shapes-demo \
        [--seed 0] [--threads 1] [--steps N] [--resume]

Recipe (see TRAINING.md written next to the exported model):

* ``LlavaForConditionalGeneration``: CLIP vision tower (112 px, patch 7 -> 256 image
  tokens) + Llama text model, word-level closed vocabulary, tied embeddings,
  ``vision_feature_layer=-1``.
* Shared-image-prefix packing: every image carries ~8 question/answer segments
  (all five types).  A 4D boolean mask lets each segment see the image prefix and
  itself (causally); position ids restart after the prefix for each segment, so a
  segment is computed exactly as the stand-alone prompt would be.
* Loss on answer tokens + ``</s>`` only, plus dense auxiliary per-patch losses on
  the projected image tokens (colour / shape / object index from the left / centre
  flag per patch, and global counts / presence targets), through training-only
  linear heads.  The auxiliary weight decays over training.
* AdamW, linear warm-up then cosine decay over the step budget, grad clip 1.0.
* Data is generated on the fly; training scene ``i`` of step ``s`` is seeded with
  ``f"train/{seed}/{s}/{i}"`` so a resumed run sees exactly the same data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from . import scenes as S
from .processor import (
    ASSISTANT_ID,
    BOS_ID,
    CLIP_MEAN,
    CLIP_STD,
    EOS_ID,
    IMAGE_ID,
    IMAGE_SEQ_LEN,
    PAD_ID,
    PATCH_SIZE,
    USER_ID,
    VOCAB,
    build_processor,
    encode_words,
)

GRID = S.MODEL_SIZE // PATCH_SIZE  # 16
PREFIX_LEN = 2 + IMAGE_SEQ_LEN  # <s> <|user|> <image>*256

DEFAULTS = dict(
    vis_hidden=192, vis_layers=6, vis_heads=3, vis_mlp=768,
    txt_hidden=256, txt_layers=6, txt_heads=4, txt_kv_heads=2, txt_mlp=640,
    vision_steps=1500, vis_exit_acc=0.9, p1_global_w=1.0, p1_local_exit=0.85, vis_lr=1.5e-3, vis_warmup=30,
    batch=16, lr=1e-3, warmup=60, min_lr_frac=0.05, wd=0.05,
    aux_w0=1.0, aux_w1=0.1, aux_decay_frac=0.5,
    llm_aux_w=0.0, llm_aux_layer=3, extra_qa=0,  # LLM-side aux head: off in the shipped recipe
    pos_init="sincos", qk_init="default", qk_std=0.06,
    resize_prob=0.3, eval_every=100, ckpt_minutes=5.0, n_eval=250, eval_seed=12345,
)


# ----------------------------------------------------------------------------- model

def build_model(cfg: dict):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vc = CLIPVisionConfig(
        image_size=S.MODEL_SIZE, patch_size=PATCH_SIZE, hidden_size=cfg["vis_hidden"],
        intermediate_size=cfg["vis_mlp"], num_hidden_layers=cfg["vis_layers"],
        num_attention_heads=cfg["vis_heads"], projection_dim=cfg["vis_hidden"],
    )
    tc = LlamaConfig(
        vocab_size=len(VOCAB), hidden_size=cfg["txt_hidden"], intermediate_size=cfg["txt_mlp"],
        num_hidden_layers=cfg["txt_layers"], num_attention_heads=cfg["txt_heads"],
        num_key_value_heads=cfg["txt_kv_heads"], max_position_embeddings=512,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vc, text_config=tc, image_token_index=IMAGE_ID, image_seq_length=IMAGE_SEQ_LEN,
        vision_feature_layer=-1, vision_feature_select_strategy="default", tie_word_embeddings=True,
        projector_hidden_act="gelu",
    )
    config.bos_token_id, config.eos_token_id, config.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    model = LlavaForConditionalGeneration(config)
    model.generation_config.bos_token_id = BOS_ID
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    init_vision(model, cfg)
    return model


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """(grid*grid, dim) 2D sin/cos position code: half the channels encode y, half x."""
    d = dim // 4
    omega = 1.0 / (100.0 ** (torch.arange(d, dtype=torch.float32) / d))
    ys, xs = torch.meshgrid(torch.arange(grid).float(), torch.arange(grid).float(), indexing="ij")
    out = []
    for c in (ys.flatten(), xs.flatten()):
        a = c[:, None] * omega[None]
        out += [torch.sin(a), torch.cos(a)]
    pe = torch.cat(out, 1)
    if pe.shape[1] < dim:
        pe = torch.cat([pe, torch.zeros(pe.shape[0], dim - pe.shape[1])], 1)
    return pe


@torch.no_grad()
def init_vision(model, cfg: dict) -> None:
    """Locality-friendly initialisation of the from-scratch CLIP tower (training speed only).

    * ``pos_init=sincos``: position embeddings start as a 2D sin/cos code, scaled to the
      patch-embedding norm, so nearby patches have similar codes from step 0.
    * ``qk_init=tied``: each attention layer starts with ``W_k = W_q`` (bias 0), so
      ``W_q W_k^T`` is positive semi-definite: tokens attend to tokens that look alike,
      i.e. to nearby patches and patches of the same colour (object grouping).
    """
    vt = model.model.vision_tower
    dim = cfg["vis_hidden"]
    if cfg.get("pos_init") == "sincos":
        pe = sincos_2d(dim, GRID)
        g = torch.Generator().manual_seed(1234)
        # typical patch-embedding norm for a CLIP-normalised image (bg ~ +1.9, objects ~ -1..1)
        x = torch.randn(8, 3, S.MODEL_SIZE, S.MODEL_SIZE, generator=g) * 0.3 + 1.5
        pn = vt.embeddings.patch_embedding(x).flatten(2).transpose(1, 2).norm(dim=-1).mean()
        scale = float(pn / pe.norm(dim=-1).mean())
        w = vt.embeddings.position_embedding.weight
        w[1:] = pe * scale
        w[0] = 0.0
    if cfg.get("qk_init") == "tied":
        for layer in vt.encoder.layers:
            a = layer.self_attn
            a.q_proj.weight.normal_(0.0, cfg["qk_std"])
            a.k_proj.weight.copy_(a.q_proj.weight)
            a.q_proj.bias.zero_()
            a.k_proj.bias.zero_()


AUX_SPEC = [  # name, classes (per patch)
    ("color", 6), ("shape", 4), ("rank", 5), ("centre", 2),
]
GLOBAL_SPEC = [("n_circle", 5), ("n_square", 5), ("n_triangle", 5), ("n_total", 5)]
N_PRESENCE = len(S.COLOR_NAMES) * len(S.SHAPES)


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


# Targets of the LLM-side auxiliary head, read at every supervised position (the
# <|assistant|> token and the answer tokens) from the hidden state after
# ``llm_aux_layer`` decoder layers.  Question-side targets (what is asked) and
# image-side targets (what the image contains) are each learnable on their own, which
# breaks the saddle where the answer depends only on their interaction.
LLM_Q_SPEC = [("q_type", 5), ("q_color", 6), ("q_shape", 4), ("q_cs", 16)]
LLM_I_SPEC = ([("n_circle", 5), ("n_square", 5), ("n_triangle", 5), ("n_total", 5)]
              + [(f"color_of_{s}", 6) for s in S.SHAPES] + [(f"shape_of_{c}", 4) for c in S.COLOR_NAMES]
              + [(f"rank{k}_color", 6) for k in range(4)] + [(f"rank{k}_shape", 4) for k in range(4)])


def question_targets(q: str) -> dict:
    qt, arg = S.parse_question(q)
    c = arg if qt == "shape" else (arg[0] if qt == "exist" else None)
    sh = arg if qt in ("color", "count") else (arg[1] if qt == "exist" else None)
    return dict(
        q_type=S.QTYPES.index(qt),
        q_color=S.COLOR_NAMES.index(c) + 1 if c else 0,
        q_shape=S.SHAPES.index(sh) + 1 if sh else 0,
        q_cs=(S.COLOR_NAMES.index(c) * 3 + S.SHAPES.index(sh) + 1) if qt == "exist" else 0,
    )


def image_targets(objs) -> dict:
    t = {}
    for s in S.SHAPES:
        m = [o for o in objs if o.shape == s]
        t[f"color_of_{s}"] = S.COLOR_NAMES.index(m[0].color) + 1 if len(m) == 1 else 0
    for c in S.COLOR_NAMES:
        m = [o for o in objs if o.color == c]
        t[f"shape_of_{c}"] = S.SHAPES.index(m[0].shape) + 1 if len(m) == 1 else 0
    for k in range(4):
        t[f"rank{k}_color"] = S.COLOR_NAMES.index(objs[k].color) + 1 if k < len(objs) else 0
        t[f"rank{k}_shape"] = S.SHAPES.index(objs[k].shape) + 1 if k < len(objs) else 0
    return t


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


# ----------------------------------------------------------------------------- data

_MEAN = np.array(CLIP_MEAN, dtype=np.float32)
_STD = np.array(CLIP_STD, dtype=np.float32)


def to_pixels(img: Image.Image) -> np.ndarray:
    """Same as the processor: bicubic resize to 112x112, rescale, CLIP-normalise. (3, H, W)."""
    if img.size != (S.MODEL_SIZE, S.MODEL_SIZE):
        img = img.resize((S.MODEL_SIZE, S.MODEL_SIZE), Image.BICUBIC)
    x = np.asarray(img, dtype=np.float32) / 255.0
    return ((x - _MEAN) / _STD).transpose(2, 0, 1)


def patch_labels(lab_img: Image.Image, objs) -> dict:
    """Per-patch aux targets from the label map (value k+1 = objs[k]; objs sorted left to right)."""
    w, h = lab_img.size
    if (w, h) != (S.MODEL_SIZE, S.MODEL_SIZE):
        lab_img = lab_img.resize((S.MODEL_SIZE, S.MODEL_SIZE), Image.NEAREST)
    lab = np.asarray(lab_img).reshape(GRID, PATCH_SIZE, GRID, PATCH_SIZE).transpose(0, 2, 1, 3).reshape(GRID * GRID, -1)
    counts = np.stack([(lab == k + 1).sum(1) for k in range(len(objs))], 1)  # (256, n)
    best = counts.argmax(1)
    has = counts.max(1) >= 12  # >= ~25% of the patch
    color = np.zeros(GRID * GRID, np.int64)
    shape = np.zeros(GRID * GRID, np.int64)
    rank = np.zeros(GRID * GRID, np.int64)
    for k, o in enumerate(objs):
        m = has & (best == k)
        color[m] = S.COLOR_NAMES.index(o.color) + 1
        shape[m] = S.SHAPES.index(o.shape) + 1
        rank[m] = k + 1
    centre = np.zeros(GRID * GRID, np.int64)
    for o in objs:
        px = min(GRID - 1, int(o.cx * S.MODEL_SIZE / w / PATCH_SIZE))
        py = min(GRID - 1, int(o.cy * S.MODEL_SIZE / h / PATCH_SIZE))
        centre[py * GRID + px] = 1
    pres = np.zeros(N_PRESENCE, np.float32)
    for o in objs:
        pres[S.COLOR_NAMES.index(o.color) * len(S.SHAPES) + S.SHAPES.index(o.shape)] = 1.0
    return dict(
        color=color, shape=shape, rank=rank, centre=centre, presence=pres,
        n_circle=sum(o.shape == "circle" for o in objs), n_square=sum(o.shape == "square" for o in objs),
        n_triangle=sum(o.shape == "triangle" for o in objs), n_total=len(objs),
    )


def train_questions(rng: random.Random, objs, extra: int = 0) -> list[tuple]:
    """~8 questions per training image covering all five types, plus ``extra`` rounds of
    extra question-conditioned lookups (exist yes + no, color, shape); the extra ones are
    drawn after the standard ones, so the standard questions do not change."""
    qs = [S.sample_question(rng, objs, "describe")]
    for s in S.SHAPES:
        qs.append((S.question_text("count", s), S.answer(objs, "count", s)))
    qs.append(S.sample_question(rng, objs, "exist", want="yes"))
    qs.append(S.sample_question(rng, objs, "exist", want="no"))
    for qt in ("color", "shape"):
        qa = S.sample_question(rng, objs, qt)
        if qa is not None:
            qs.append(qa)
    for _ in range(extra):
        qs.append(S.sample_question(rng, objs, "exist", want="yes"))
        qs.append(S.sample_question(rng, objs, "exist", want="no"))
        for qt in ("color", "shape"):
            qa = S.sample_question(rng, objs, qt)
            if qa is not None and qa not in qs:
                qs.append(qa)
    return qs


def random_render_size(rng: random.Random):
    w = rng.randint(64, 400)
    h = int(round(w * math.exp(rng.uniform(math.log(0.75), math.log(1.333)))))
    return (w, max(64, min(400, h)))


def make_train_example(seed: int, step: int, index: int, resize_prob: float, extra_qa: int = 0):
    rng = S.train_rng(seed, step, index)
    size = random_render_size(rng) if rng.random() < resize_prob else S.MODEL_SIZE
    img, objs, lab = S.make_scene(rng, size, with_labels=True)
    labels = patch_labels(lab, objs)
    labels.update(image_targets(objs))
    return to_pixels(img), labels, train_questions(rng, objs, extra_qa)


def segment(q: str, a: str):
    """(ids, n_question_tokens) for ``q <|assistant|> a </s>``."""
    qi = encode_words(q)
    ai = encode_words(a)
    return qi + [ASSISTANT_ID] + ai + [EOS_ID], len(qi)


def pack(examples_qas: list[list[tuple]]):
    """Pack per-image question lists into shared-prefix sequences.

    Returns input ids (B, L), position ids, 4D bool mask (B, 1, L, L), and the
    supervised (batch, position, target, segment-id) lists.
    """
    B = len(examples_qas)
    seqs, poss, segs_of = [], [], []
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
        segs_of.append(seg)
    L = max(len(s) for s in seqs)
    ids_t = torch.full((B, L), PAD_ID, dtype=torch.long)
    pos_t = torch.zeros((B, L), dtype=torch.long)
    seg_t = torch.full((B, L), -1, dtype=torch.long)
    for b in range(B):
        n = len(seqs[b])
        ids_t[b, :n] = torch.tensor(seqs[b])
        pos_t[b, :n] = torch.tensor(poss[b])
        seg_t[b, :n] = torch.tensor(segs_of[b])
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    si = seg_t[:, :, None]
    sj = seg_t[:, None, :]
    allowed = ((sj == 0) | (si == sj)) & (si >= 0) & (sj >= 0)
    mask = causal[None] & allowed
    mask |= torch.eye(L, dtype=torch.bool)[None]  # padding rows attend to themselves (no NaN)
    return (ids_t, pos_t, mask[:, None], torch.tensor(sup_b), torch.tensor(sup_p), torch.tensor(sup_t),
            torch.tensor(sup_seg), seg_counter)


def collate_labels(labs: list[dict]) -> dict:
    out = {}
    for k in labs[0]:
        out[k] = torch.as_tensor(np.stack([np.asarray(lab[k]) for lab in labs]))
    return out


# ----------------------------------------------------------------------------- forward

def packed_forward(model, pixel_values, ids, pos, mask, sup_b, sup_p, mid_layer=None):
    """Returns (logits at supervised positions, projected image tokens[, hidden state at
    the supervised positions after ``mid_layer`` decoder layers])."""
    inner = model.model
    vis = inner.vision_tower(pixel_values)
    feats = vis.last_hidden_state[:, 1:]  # == hidden_states[-1][:, 1:] (vision_feature_layer=-1, "default")
    img_tok = inner.multi_modal_projector(feats)
    emb = inner.language_model.embed_tokens(ids)
    emb = torch.cat([emb[:, :2], img_tok.to(emb.dtype), emb[:, PREFIX_LEN:]], 1)
    out = inner.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                               output_hidden_states=mid_layer is not None)
    logits = model.lm_head(out.last_hidden_state[sup_b, sup_p])
    if mid_layer is None:
        return logits, img_tok
    return logits, img_tok, out.hidden_states[mid_layer][sup_b, sup_p]


def segment_exact_match(logits, sup_t, sup_seg, n_seg):
    ok = (logits.argmax(-1) == sup_t).float()
    wrong = torch.zeros(n_seg).index_add_(0, sup_seg, 1.0 - ok)
    return wrong == 0


# ----------------------------------------------------------------------------- eval

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


# ----------------------------------------------------------------------------- export

def export(model, out_dir: str, info: dict) -> None:
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    model.save_pretrained(tmp, dtype=torch.float16) if _save_accepts_dtype(model) else _save_fp16(model, tmp)
    build_processor().save_pretrained(tmp)
    with open(os.path.join(tmp, "TRAINING.md"), "w") as f:
        f.write(training_md(info))
    for name in os.listdir(tmp):  # safetensors writes 0600 files
        os.chmod(os.path.join(tmp, name), 0o644)
    if os.path.isdir(out_dir):
        old = out_dir.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
        os.rename(tmp, out_dir)


def _save_accepts_dtype(model) -> bool:
    return False


def _save_fp16(model, path: str) -> None:
    import copy
    m16 = copy.deepcopy(model).to(torch.float16)
    m16.config.dtype = "float16"
    m16.save_pretrained(path)


def training_md(info: dict) -> str:
    acc = info.get("last_eval") or {}
    step = info.get("step", 0)
    p1_steps = info["p2"] if info.get("p2") is not None else step  # phase 2 starts at step p2
    lines = [
        "# shapes-demo: training record",
        "",
        "Tiny LLaVA (CLIP vision 112 px / patch 7 -> 256 image tokens, Llama text) trained from scratch on",
        "synthetic shapes scenes (`lightvlm_core/demo/scenes.py`).",
        "",
        "- command(s), in order (the run was resumed from its checkpoint after each):",
        *[f"  - `{c}`" for c in (info.get("history") or [info.get("command")])],
        f"- seed: {info.get('seed')}, threads: {info.get('threads')}",
        *([f"- warm start: the `--init` command continued the model the commands before it exported ({info['init']})"]
          if info.get("init") else []),
        f"- phase 1 (vision tower + auxiliary heads only): {p1_steps} steps",
        f"- full-model steps: {max(0, step - p1_steps)} / {info.get('steps')}"
        f" (batch {info.get('batch')} images, ~8 QA segments each, +4 per `extra_qa` round)",
        f"- wall time: {info.get('wall_s', 0) / 60:.1f} min of training",
        f"- hardware: {info.get('hardware')}",
        f"- torch {torch.__version__}, transformers {info.get('transformers')}",
        f"- parameters: {info.get('params')}",
        f"- last held-out teacher-forced exact match (== greedy exact match), {info.get('n_eval')} questions, "
        f"heldout seed {info.get('eval_seed')}, at step {info.get('eval_step')}:",
        "",
        "| " + " | ".join(list(acc)) + " |",
        "|" + "---|" * len(acc),
        "| " + " | ".join(f"{v:.3f}" for v in acc.values()) + " |",
        "",
        "Recipe: phase 1 trains only the vision tower + projector on dense per-patch auxiliary targets; phase 2 trains",
        "everything with shared-image-prefix packing of ~8 questions per image (4D mask), loss on answer tokens",
        "+ `</s>` plus the decaying auxiliary loss. CLIP position embeddings start as a 2D sin/cos code.",
        "The auxiliary heads are training-only (not exported).",
        "AdamW with warm-up + cosine decay over the phase-2 step budget, grad clip 1.0.",
        "See `lightvlm_core/demo/train.py`.",
        "",
    ]
    if info.get("init_record"):  # nested records keep their own nesting one level down
        lines += ["## The warm-started model's own record", "",
                  *[("#" + ln if ln.startswith("#") else ln) for ln in info["init_record"].splitlines()], ""]
    return "\n".join(lines)


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, CPU only"


# ----------------------------------------------------------------------------- warm start

def warm_start(model, init_dir: str) -> None:
    """Load an exported checkpoint (fp16 safetensors) into the freshly built fp32 model."""
    from transformers import LlavaForConditionalGeneration
    src = LlavaForConditionalGeneration.from_pretrained(init_dir, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)


def read_record(init_dir: str) -> str:
    """``init_dir/TRAINING.md`` without its title: the record of the run a warm start continues."""
    path = os.path.join(init_dir, "TRAINING.md")
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        lines = f.read().strip().splitlines()
    return "\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines).strip()


def record_commands(record: str) -> list[str]:
    """The training commands listed in a record, in order."""
    cmds = []
    for line in record.splitlines():
        if line.startswith("## "):  # a nested record: its commands are already in the list above
            break
        if line.strip().startswith("- `python -m lightvlm_core.demo.train"):
            cmds.append(line.strip()[3:-1])
    return cmds


# ----------------------------------------------------------------------------- main

def lr_at(step: int, cfg: dict, steps: int, p2) -> float:
    """Phase 1 (``p2 is None``): vision-only warm-up then constant; phase 2 (started at
    step ``p2``, lasting ``steps`` steps): warm-up then cosine decay."""
    if p2 is None:
        return cfg["vis_lr"] * min(1.0, (step + 1) / cfg["vis_warmup"])
    step = step - p2
    if step < cfg["warmup"]:
        return cfg["lr"] * (step + 1) / cfg["warmup"]
    t = (step - cfg["warmup"]) / max(1, steps - cfg["warmup"])
    t = min(1.0, t)
    return cfg["lr"] * (cfg["min_lr_frac"] + (1 - cfg["min_lr_frac"]) * 0.5 * (1 + math.cos(math.pi * t)))


def aux_weight(step: int, cfg: dict, steps: int, p2) -> float:
    if p2 is None:
        return 1.0
    step = step - p2
    t = min(1.0, step / max(1, cfg["aux_decay_frac"] * steps))
    return cfg["aux_w1"] + (cfg["aux_w0"] - cfg["aux_w1"]) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model, aux, cfg):
    decay, no_decay = [], []
    for mod in (model, aux):
        for n, p in mod.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "embed" not in n else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg["wd"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=cfg["lr"], betas=(0.9, 0.98), eps=1e-8)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--export", default="models/shapes-demo")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2500)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--init", default=None,
                    help="warm start: continue training an exported model directory (skips phase 1; use a new --seed)")
    ap.add_argument("--bench", type=int, default=0, help="time N steps and exit (no files written)")
    ap.add_argument("--set", nargs="*", default=[], help="override recipe values, key=value")
    args = ap.parse_args(argv)

    cfg = dict(DEFAULTS)
    for kv in args.set:
        k, v = kv.split("=", 1)
        cfg[k] = type(DEFAULTS[k])(v)

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()

    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    log_path = os.path.join(args.out, "log.jsonl")
    state = None
    if args.resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = dict(state["cfg"])
        for key in ("llm_aux_w", "llm_aux_layer", "extra_qa"):  # recipe keys added later: off for old runs
            cfg.setdefault(key, 0.0 if key == "llm_aux_w" else DEFAULTS[key])
        for kv in args.set:
            k, v = kv.split("=", 1)
            cfg[k] = type(DEFAULTS[k])(v)
        args.seed = state["seed"]
    torch.manual_seed(args.seed)
    model = build_model(cfg)
    aux = AuxHeads(cfg["txt_hidden"])
    llm_aux = LLMAuxHead(cfg["txt_hidden"])
    model.train()
    opt = make_optimizer(model, aux, cfg)
    opt_llm_aux = torch.optim.AdamW(llm_aux.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.0)
    step = 0
    wall = 0.0
    last_eval = None
    eval_step = None
    if state is not None:
        model.load_state_dict(state["model"])
        aux.load_state_dict(state["aux"])
        opt.load_state_dict(state["opt"])
        if "llm_aux" in state:
            llm_aux.load_state_dict(state["llm_aux"])
            opt_llm_aux.load_state_dict(state["opt_llm_aux"])
        step = state["step"]
        wall = state["wall_s"]
        last_eval, eval_step = state.get("last_eval"), state.get("eval_step")
        torch.set_rng_state(state["torch_rng"])
        if args.steps != state["steps"]:
            print(f"note: step budget changed {state['steps']} -> {args.steps}", file=sys.stderr)
    steps = args.steps
    p2 = None if cfg.get("vision_steps", 0) > 0 else 0  # step at which phase 2 (full model) started
    ema = {}
    if state is not None:
        p2, ema = state.get("p2", 0), state.get("ema", {})
        cfg.setdefault("init", None)
        cfg.setdefault("init_record", "")
    elif args.init:
        warm_start(model, args.init)
        cfg["init"] = args.init
        cfg["init_record"] = read_record(args.init)  # read now: the export may overwrite init_dir
        p2 = 0  # the exported model is past phase 1
    n_params = sum(p.numel() for p in model.parameters())

    if not args.bench:
        os.makedirs(args.out, exist_ok=True)
    evalset = EvalSet(cfg["n_eval"], cfg["eval_seed"]) if not args.bench else None
    info = dict(
        command="python -m lightvlm_core.demo.train " + " ".join(sys.argv[1:] if argv is None else argv),
        seed=args.seed, threads=args.threads, steps=steps, batch=cfg["batch"], hardware=hardware(),
        transformers=transformers.__version__, params=n_params, n_eval=cfg["n_eval"], eval_seed=cfg["eval_seed"],
    )

    def log(rec):
        print(json.dumps(rec), flush=True)
        if not args.bench:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def checkpoint():
        tmp = ckpt_path + ".tmp"
        torch.save(dict(model=model.state_dict(), aux=aux.state_dict(), opt=opt.state_dict(),
                        llm_aux=llm_aux.state_dict(), opt_llm_aux=opt_llm_aux.state_dict(), step=step,
                        steps=steps, wall_s=wall, cfg=cfg, seed=args.seed, p2=p2, ema=ema,
                        torch_rng=torch.get_rng_state(),
                        last_eval=last_eval, eval_step=eval_step), tmp)
        os.replace(tmp, ckpt_path)
        export(model, args.export, dict(info, step=step, steps=steps, p2=p2, wall_s=wall, last_eval=last_eval,
                                        eval_step=eval_step, init=cfg.get("init"), init_record=cfg.get("init_record")))

    def trained_out() -> bool:  # phase 2 has run its whole step budget
        return p2 is not None and step >= p2 + steps

    if not args.bench:
        hist_path = os.path.join(args.out, "commands.txt")
        if state is None and os.path.exists(hist_path):
            os.remove(hist_path)
        if not trained_out():  # resuming a finished run only re-exports: it is not part of the recipe
            with open(hist_path, "a") as f:
                f.write(info["command"] + "\n")
        with open(hist_path) as f:
            info["history"] = [line.strip() for line in f if line.strip()]
        if cfg.get("init"):  # the warm-started model's own commands come first
            info["history"] = record_commands(cfg["init_record"]) + info["history"]
    if state is None and not args.bench:
        log(dict(event="start", cfg=cfg, params=n_params, **{k: info[k] for k in ("seed", "threads", "steps")}))
    elif not args.bench:
        log(dict(event="resume", step=step, command=info["command"], cfg=cfg))

    n_done = 0
    last_ckpt = time.time()
    t_log = time.time()
    loss_acc, aux_acc, n_acc, llm_aux_acc = 0.0, 0.0, 0, 0.0
    while True:
        if args.bench and n_done >= args.bench:
            break
        if not args.bench and trained_out():
            break
        n_done += 1
        t0 = time.time()
        exs = [make_train_example(args.seed, step, i, cfg["resize_prob"], cfg.get("extra_qa", 0))
               for i in range(cfg["batch"])]
        pix = torch.from_numpy(np.stack([e[0] for e in exs]))
        labs = collate_labels([e[1] for e in exs])
        ids, pos, mask, sb, sp, st, sseg, nseg = pack([e[2] for e in exs])
        t_data = time.time() - t0
        lr = lr_at(step, cfg, steps, p2)
        for g in opt.param_groups + opt_llm_aux.param_groups:
            g["lr"] = lr
        phase1 = p2 is None
        if phase1:
            feats = model.model.vision_tower(pix).last_hidden_state[:, 1:]
            img_tok = model.model.multi_modal_projector(feats)
            main_loss = torch.zeros(())
        else:
            use_llm_aux = cfg["llm_aux_w"] > 0
            res = packed_forward(model, pix, ids, pos, mask, sb, sp,
                                 mid_layer=cfg["llm_aux_layer"] if use_llm_aux else None)
            logits, img_tok = res[0], res[1]
            main_loss = F.cross_entropy(logits, st)
            if use_llm_aux:
                seg_q = [question_targets(q) for e in exs for q, _ in e[2]]
                qt_t = {k: torch.tensor([seg_q[j][k] for j in sseg.tolist()]) for k, _ in LLM_Q_SPEC}
                it_t = {k: labs[k][sb] for k, _ in LLM_I_SPEC}
                llm_aux_loss = llm_aux.loss(res[2], qt_t, it_t, labs["presence"][sb])
                main_loss_for_grad = main_loss + cfg["llm_aux_w"] * llm_aux_loss
                llm_aux_acc += llm_aux_loss.item()
        aw = aux_weight(step, cfg, steps, p2)
        gw = 1.0 if (not phase1 or ema.get("global_on")) else cfg.get("p1_global_w", 1.0)
        aux_loss = aux.loss(img_tok, labs, gw)
        loss = (main_loss_for_grad if (not phase1 and cfg["llm_aux_w"] > 0) else main_loss) + aw * aux_loss
        am = aux_metrics(aux, img_tok.detach(), labs) if (step % 50 == 0 or (phase1 and step % 10 == 0)) else None
        if phase1 and am is not None:  # deterministic (training-batch) accuracy, measured before the update
            for k, v in am.items():
                ema[k] = v if k not in ema else 0.8 * ema[k] + 0.2 * v
        opt.zero_grad(set_to_none=True)
        opt_llm_aux.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(list(model.parameters()) + list(aux.parameters()), 1.0)
        opt.step()
        if not phase1 and cfg["llm_aux_w"] > 0:
            opt_llm_aux.step()
        step += 1
        dt = time.time() - t0
        wall += dt
        loss_acc += main_loss.item()
        aux_acc += aux_loss.item()
        n_acc += 1
        if args.bench or step % 10 == 0:
            log(dict(step=step, loss=round(loss_acc / n_acc, 4), aux=round(aux_acc / n_acc, 4), aux_w=round(aw, 3),
                     llm_aux=round(llm_aux_acc / n_acc, 4),
                     lr=round(lr, 6), gnorm=round(float(gn), 3), s_per_step=round((time.time() - t_log) / n_acc, 3),
                     data_s=round(t_data, 3), seq_len=ids.shape[1], wall_s=round(wall, 1)))
            loss_acc, aux_acc, n_acc, llm_aux_acc = 0.0, 0.0, 0, 0.0
            t_log = time.time()
        if am is not None and (step - 1) % 50 == 0:
            log(dict(event="aux_acc", step=step - 1, **am, **({"ema_shape": round(ema["a_shape"], 3)} if ema else {})))
        if phase1 and am is not None and not ema.get("global_on") and (
                cfg.get("p1_global_w", 1.0) >= 1.0 or (step >= 100 and ema["a_shape"] >= cfg["p1_local_exit"])):
            ema["global_on"] = step  # local targets learned: switch on rank / global targets
            log(dict(event="global_on", step=step))
        if phase1 and am is not None and (step >= cfg["vision_steps"] or (
                step >= 100 and ema.get("global_on") and
                min(ema["a_shape"], ema["a_rank"], ema["a_n_total"]) >= cfg["vis_exit_acc"])):
            p2 = step
            log(dict(event="phase2", step=step, wall_s=round(wall, 1), **{k: round(v, 3) for k, v in ema.items()}))
        if args.bench:
            continue
        done = trained_out()
        if (step % cfg["eval_every"] == 0 and not phase1) or done:
            te = time.time()
            last_eval = evalset.run(model)
            eval_step = step
            log(dict(event="eval", step=step, wall_s=round(wall, 1), eval_s=round(time.time() - te, 1), **last_eval))
            t_log += time.time() - te
        if time.time() - last_ckpt > cfg["ckpt_minutes"] * 60 or done:
            tc = time.time()
            checkpoint()
            last_ckpt = time.time()
            log(dict(event="checkpoint", step=step, ckpt_s=round(time.time() - tc, 1)))
            t_log += time.time() - tc
    if not args.bench:
        if n_done == 0:  # nothing left to train (e.g. --resume of a finished run): refresh the export
            checkpoint()
        log(dict(event="done", step=step, wall_s=round(wall, 1), last_eval=last_eval))


if __name__ == "__main__":
    main()
