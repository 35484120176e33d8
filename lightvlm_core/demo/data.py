"""Training data for the shapes demo, generated on the fly.

Training scene ``i`` of step ``s`` is seeded with ``f"train/{seed}/{s}/{i}"`` (``scenes.train_rng``),
so a resumed run sees exactly the same data.  Each example is the image as model pixels, the dense
auxiliary targets (per patch and per image) and ~8 question/answer pairs covering all five types.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

from . import scenes as S
from .processor import CLIP_MEAN, CLIP_STD, GRID, PATCH_SIZE

N_PRESENCE = len(S.COLOR_NAMES) * len(S.SHAPES)  # one "is there a <colour> <shape>" flag per pair

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
    return dict(color=color, shape=shape, rank=rank, centre=centre, **scene_counts(objs))


def scene_counts(objs) -> dict:
    """Whole-image targets: which colour/shape pairs are present, and the counts per shape."""
    pres = np.zeros(N_PRESENCE, np.float32)
    for o in objs:
        pres[S.COLOR_NAMES.index(o.color) * len(S.SHAPES) + S.SHAPES.index(o.shape)] = 1.0
    return dict(
        presence=pres,
        n_circle=sum(o.shape == "circle" for o in objs), n_square=sum(o.shape == "square" for o in objs),
        n_triangle=sum(o.shape == "triangle" for o in objs), n_total=len(objs),
    )


def question_targets(q: str) -> dict:
    """What a question asks, as class ids (0 = not applicable): the LLM-side head's question targets."""
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
    """The LLM-side head's image targets: colour of each unique shape, shape of each unique colour,
    colour and shape of the four leftmost objects (0 = none or ambiguous)."""
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
    """A (w, h) render size in [64, 400] with aspect ratio in [0.75, 1.333] (resize augmentation)."""
    w = rng.randint(64, 400)
    h = int(round(w * math.exp(rng.uniform(math.log(0.75), math.log(1.333)))))
    return (w, max(64, min(400, h)))


def make_train_example(seed: int, step: int, index: int, resize_prob: float, extra_qa: int = 0):
    """(pixels, targets, question/answer pairs) of training scene ``index`` of ``step``."""
    rng = S.train_rng(seed, step, index)
    size = random_render_size(rng) if rng.random() < resize_prob else S.MODEL_SIZE
    img, objs, lab = S.make_scene(rng, size, with_labels=True)
    labels = patch_labels(lab, objs)
    labels.update(image_targets(objs))
    return to_pixels(img), labels, train_questions(rng, objs, extra_qa)


def collate_labels(labs: list[dict]) -> dict:
    """Stack each target over the batch into one tensor."""
    out = {}
    for k in labs[0]:
        out[k] = torch.as_tensor(np.stack([np.asarray(lab[k]) for lab in labs]))
    return out
