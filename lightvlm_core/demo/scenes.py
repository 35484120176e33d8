"""Seeded synthetic scene + question generator for the shapes demo model.

Scenes: 1-4 filled, non-overlapping objects (circle / square / triangle, apex up)
in one of five colours (small per-channel jitter) on a plain white or light-grey
background.  Sizes and positions vary; object centre x's differ by at least
``MIN_DX_FRAC`` of the image width so that "left to right" is unambiguous.

Question types (exact strings; answers are lower case, a final period optional):

* ``color``    ``What color is the {shape}?``          -> ``{color}``  (exactly one object of that shape)
* ``shape``    ``What shape is the {color} object?``   -> ``{shape}``  (exactly one object of that colour)
* ``count``    ``How many {shape}s are there?``        -> ``zero`` .. ``four``
* ``exist``    ``Is there a {color} {shape}?``         -> ``yes`` | ``no``
* ``describe`` ``Describe the image.``                 -> ``red circle, blue square and green triangle``

Seeding scheme
--------------
Every scene is drawn from its own ``random.Random`` seeded by a string:

* training:  ``f"train/{seed}/{step}/{index}"``  (see :func:`train_rng`)
* held-out:  ``f"heldout/{seed}/{index}"``       (see :func:`heldout_rng`)

The two namespaces never produce the same seed string, so held-out scenes are
never training scenes (Python seeds ``Random`` from a string via SHA-512).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
}
COLOR_NAMES = list(COLORS)
SHAPES = ["circle", "square", "triangle"]
NUMBERS = ["zero", "one", "two", "three", "four"]
QTYPES = ["color", "shape", "count", "exist", "describe"]

MODEL_SIZE = 112
JITTER = 12  # per-channel colour jitter (+-)
SIZE_FRAC = (0.17, 0.30)  # object side as a fraction of min(width, height)
GAP_FRAC = 0.03  # minimum gap between bounding boxes
MIN_DX_FRAC = 0.07  # minimum |centre x| difference between any two objects


@dataclass
class Obj:
    shape: str
    color: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive pixel coords)
    rgb: tuple[int, int, int]

    @property
    def cx(self) -> float:
        return (self.box[0] + self.box[2]) / 2.0

    @property
    def cy(self) -> float:
        return (self.box[1] + self.box[3]) / 2.0


def _draw(d: ImageDraw.ImageDraw, o: Obj, fill) -> None:
    x0, y0, x1, y1 = o.box
    if o.shape == "circle":
        d.ellipse(o.box, fill=fill)
    elif o.shape == "square":
        d.rectangle(o.box, fill=fill)
    else:
        d.polygon([((x0 + x1) / 2.0, y0), (x0, y1), (x1, y1)], fill=fill)


def _place(rng: random.Random, w: int, h: int, n: int) -> list[tuple[int, int, int, int]]:
    m = min(w, h)
    lo, hi = max(6, int(round(m * SIZE_FRAC[0]))), max(7, int(round(m * SIZE_FRAC[1])))
    gap = max(2, int(round(m * GAP_FRAC)))
    min_dx = max(4.0, w * MIN_DX_FRAC)
    for _ in range(200):  # restart if rejection sampling gets stuck
        boxes: list[tuple[int, int, int, int]] = []
        tries = 0
        while len(boxes) < n and tries < 300:
            tries += 1
            s = rng.randint(lo, hi)
            x0 = rng.randint(1, w - s - 2)
            y0 = rng.randint(1, h - s - 2)
            b = (x0, y0, x0 + s, y0 + s)
            cx = x0 + s / 2.0
            ok = True
            for c in boxes:
                if not (b[2] + gap < c[0] or c[2] + gap < b[0] or b[3] + gap < c[1] or c[3] + gap < b[1]):
                    ok = False
                    break
                if abs(cx - (c[0] + c[2]) / 2.0) < min_dx:
                    ok = False
                    break
            if ok:
                boxes.append(b)
        if len(boxes) == n:
            return boxes
    raise RuntimeError("could not place objects")  # pragma: no cover


def make_scene(rng: random.Random, size=MODEL_SIZE, n_objects: int | None = None, with_labels: bool = False):
    """Draw a scene.  ``size`` is an int (square) or a (width, height) tuple.

    Returns ``(image, objs)`` with ``objs`` sorted left to right by centre x, or
    ``(image, objs, label_map)`` when ``with_labels``: an ``L`` image where pixel
    value ``k+1`` marks object ``objs[k]`` and 0 the background.
    """
    w, h = (size, size) if isinstance(size, int) else size
    n = n_objects if n_objects is not None else rng.randint(1, 4)
    boxes = _place(rng, w, h, n)
    objs = []
    for b in boxes:
        color = rng.choice(COLOR_NAMES)
        base = COLORS[color]
        rgb = tuple(min(255, max(0, c + rng.randint(-JITTER, JITTER))) for c in base)
        objs.append(Obj(rng.choice(SHAPES), color, b, rgb))
    g = 255 if rng.random() < 0.4 else rng.randint(215, 250)
    img = Image.new("RGB", (w, h), (g, g, g))
    d = ImageDraw.Draw(img)
    objs.sort(key=lambda o: o.cx)
    for o in objs:
        _draw(d, o, o.rgb)
    if not with_labels:
        return img, objs
    lab = Image.new("L", (w, h), 0)
    dl = ImageDraw.Draw(lab)
    for k, o in enumerate(objs):
        _draw(dl, o, k + 1)
    return img, objs, lab


# ----------------------------------------------------------------------------- answers

def describe(objs: Sequence[Obj]) -> str:
    items = [f"{o.color} {o.shape}" for o in sorted(objs, key=lambda o: o.cx)]
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def answer(objs: Sequence[Obj], qtype: str, arg=None) -> str:
    """Gold answer for a question type; ``arg`` is the shape / colour / (colour, shape)."""
    if qtype == "color":
        m = [o for o in objs if o.shape == arg]
        if len(m) != 1:
            raise ValueError("color question needs exactly one object of that shape")
        return m[0].color
    if qtype == "shape":
        m = [o for o in objs if o.color == arg]
        if len(m) != 1:
            raise ValueError("shape question needs exactly one object of that colour")
        return m[0].shape
    if qtype == "count":
        return NUMBERS[sum(o.shape == arg for o in objs)]
    if qtype == "exist":
        c, s = arg
        return "yes" if any(o.color == c and o.shape == s for o in objs) else "no"
    if qtype == "describe":
        return describe(objs)
    raise ValueError(qtype)


def question_text(qtype: str, arg=None) -> str:
    if qtype == "color":
        return f"What color is the {arg}?"
    if qtype == "shape":
        return f"What shape is the {arg} object?"
    if qtype == "count":
        return f"How many {arg}s are there?"
    if qtype == "exist":
        return f"Is there a {arg[0]} {arg[1]}?"
    if qtype == "describe":
        return "Describe the image."
    raise ValueError(qtype)


def askable_args(objs: Sequence[Obj], qtype: str) -> list:
    """All arguments for which ``qtype`` may be asked about this scene."""
    if qtype == "color":
        return [s for s in SHAPES if sum(o.shape == s for o in objs) == 1]
    if qtype == "shape":
        return [c for c in COLOR_NAMES if sum(o.color == c for o in objs) == 1]
    if qtype == "count":
        return list(SHAPES)
    if qtype == "exist":
        return [(c, s) for c in COLOR_NAMES for s in SHAPES]
    if qtype == "describe":
        return [None]
    raise ValueError(qtype)


def sample_question(rng: random.Random, objs: Sequence[Obj], qtype: str, want: str | None = None):
    """Sample one question of ``qtype``; returns ``(question, answer)`` or None if not askable.

    ``exist`` questions are yes/no balanced (``want`` forces one); "no" questions
    prefer hard negatives (the colour or the shape is present in the scene).
    """
    if qtype == "exist":
        present = sorted({(o.color, o.shape) for o in objs})
        yes = (rng.random() < 0.5) if want is None else (want == "yes")
        if yes:
            arg = rng.choice(present)
        else:
            absent = [(c, s) for c in COLOR_NAMES for s in SHAPES if (c, s) not in present]
            hard = [a for a in absent if any(o.color == a[0] or o.shape == a[1] for o in objs)]
            pool = hard if (hard and rng.random() < 0.7) else absent
            arg = rng.choice(pool)
    else:
        args = askable_args(objs, qtype)
        if not args:
            return None
        arg = rng.choice(args)
    return question_text(qtype, arg), answer(objs, qtype, arg)


def parse_question(q: str):
    """Inverse of :func:`question_text`: ``(qtype, arg)`` for a contract question, else None."""
    w = q.strip().rstrip("?.").lower().split()
    if w[:4] == ["what", "color", "is", "the"] and len(w) == 5 and w[4] in SHAPES:
        return "color", w[4]
    if w[:3] == ["what", "shape", "is"] and len(w) == 6 and w[4] in COLORS and w[5] == "object":
        return "shape", w[4]
    if w[:2] == ["how", "many"] and len(w) == 5 and w[2][:-1] in SHAPES and w[3:] == ["are", "there"]:
        return "count", w[2][:-1]
    if w[:3] == ["is", "there", "a"] and len(w) == 5 and w[3] in COLORS and w[4] in SHAPES:
        return "exist", (w[3], w[4])
    if w == ["describe", "the", "image"]:
        return "describe", None
    return None


def normalize_answer(s: str) -> str:
    s = " ".join(s.strip().lower().split())
    if s.endswith("."):
        s = s[:-1].rstrip()
    return s


def answer_matches(pred: str, gold: str) -> bool:
    """Exact match after lower-casing, stripping, collapsing spaces and dropping a final period."""
    return normalize_answer(pred) == normalize_answer(gold)


# ----------------------------------------------------------------------------- seeds / held-out

def train_rng(seed: int, step: int, index: int) -> random.Random:
    return random.Random(f"train/{seed}/{step}/{index}")


def heldout_rng(seed: int, index: int) -> random.Random:
    return random.Random(f"heldout/{seed}/{index}")


def heldout_scene(seed: int, index: int, size=MODEL_SIZE):
    """Held-out scene ``index``: a scene where all five question types are askable."""
    rng = heldout_rng(seed, index)
    while True:
        img, objs = make_scene(rng, size)
        if askable_args(objs, "color") and askable_args(objs, "shape"):
            return rng, img, objs


def heldout_questions(n: int, seed: int = 777, size=MODEL_SIZE) -> Iterator[tuple[Image.Image, str, str, str]]:
    """Yield ``n`` held-out ``(image, question, answer, qtype)`` tuples.

    Scene ``i`` (seeded ``f"heldout/{seed}/{i}"``, disjoint from training seeds)
    carries one question of each of the five types in ``QTYPES`` order, so the
    types are balanced; ``exist`` alternates yes / no between scenes.
    """
    k = 0
    i = 0
    while k < n:
        rng, img, objs = heldout_scene(seed, i, size)
        for qt in QTYPES:
            if k >= n:
                return
            want = ("yes" if i % 2 == 0 else "no") if qt == "exist" else None
            q, a = sample_question(rng, objs, qt, want=want)
            yield img, q, a, qt
            k += 1
        i += 1


# ----------------------------------------------------------------------------- samples for users

def sample_scene(seed: int, size=224):
    """A scene for people to try (`lightvlm make-scene`, examples/): ``(image, objs, questions)``
    with one ``(question, answer)`` per askable question type. Its own seed namespace
    (``sample/{seed}``), apart from the training and held-out scenes."""
    rng = random.Random(f"sample/{seed}")
    image, objs = make_scene(rng, size=size)
    questions = []
    for qtype in QTYPES:
        qa = sample_question(rng, objs, qtype)
        if qa is not None:
            questions.append(qa)
    return image, objs, questions
