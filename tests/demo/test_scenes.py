"""Fast tests for the synthetic shapes scene / question generator."""

import random

import numpy as np
import pytest

from lightvlm_core.demo import scenes as S
from lightvlm_core.demo.scenes import Obj


def obj(shape, color, x, y=40, s=20):
    return Obj(shape, color, (x, y, x + s, y + s), S.COLORS[color])


SCENE = [obj("square", "blue", 50), obj("circle", "red", 5), obj("triangle", "green", 85),
         obj("circle", "blue", 30, 80)]


def test_answers_hand_built():
    assert S.answer(SCENE, "color", "square") == "blue"
    assert S.answer(SCENE, "color", "triangle") == "green"
    with pytest.raises(ValueError):
        S.answer(SCENE, "color", "circle")  # two circles: not askable
    assert S.answer(SCENE, "shape", "red") == "circle"
    assert S.answer(SCENE, "shape", "green") == "triangle"
    with pytest.raises(ValueError):
        S.answer(SCENE, "shape", "blue")  # two blue objects
    with pytest.raises(ValueError):
        S.answer(SCENE, "shape", "yellow")  # none
    assert S.answer(SCENE, "count", "circle") == "two"
    assert S.answer(SCENE, "count", "square") == "one"
    assert S.answer([obj("square", "red", 5)], "count", "triangle") == "zero"
    assert S.answer(SCENE, "exist", ("blue", "circle")) == "yes"
    assert S.answer(SCENE, "exist", ("green", "circle")) == "no"
    assert S.answer(SCENE, "exist", ("purple", "square")) == "no"


def test_describe_left_to_right():
    # centres x: red circle 15, blue circle 40, blue square 60, green triangle 95 (y is irrelevant)
    assert S.describe(SCENE) == "red circle, blue circle, blue square and green triangle"
    assert S.answer(SCENE, "describe") == S.describe(SCENE)
    assert S.describe([obj("triangle", "yellow", 60)]) == "yellow triangle"
    assert S.describe([obj("square", "purple", 60), obj("circle", "green", 10)]) == "green circle and purple square"


def test_question_texts():
    assert S.question_text("color", "circle") == "What color is the circle?"
    assert S.question_text("shape", "red") == "What shape is the red object?"
    assert S.question_text("count", "triangle") == "How many triangles are there?"
    assert S.question_text("exist", ("red", "square")) == "Is there a red square?"
    assert S.question_text("describe") == "Describe the image."


def test_askable_rules():
    assert S.askable_args(SCENE, "color") == ["square", "triangle"]
    assert S.askable_args(SCENE, "shape") == ["red", "green"]
    same = [obj("circle", "red", 5), obj("circle", "red", 60)]
    assert S.sample_question(random.Random(0), same, "color") is None
    assert S.sample_question(random.Random(0), same, "shape") is None
    rng = random.Random(1)
    for _ in range(50):
        q, a = S.sample_question(rng, SCENE, "exist", want="no")
        assert a == "no"
        q, a = S.sample_question(rng, SCENE, "exist", want="yes")
        assert a == "yes"


def test_answer_matches():
    assert S.answer_matches("Red circle, blue square.", "red circle, blue square")
    assert S.answer_matches("  yes. ", "yes")
    assert S.answer_matches("two", "two.")
    assert not S.answer_matches("two circles", "two")
    assert not S.answer_matches("blue square, red circle", "red circle, blue square")


@pytest.mark.parametrize("size", [112, 224, (320, 240), (90, 130)])
def test_make_scene_invariants(size):
    w, h = (size, size) if isinstance(size, int) else size
    rng = random.Random(f"test/{size}")
    for _ in range(60):
        img, objs, lab = S.make_scene(rng, size, with_labels=True)
        assert img.size == (w, h) and lab.size == (w, h)
        assert 1 <= len(objs) <= 4
        xs = [o.cx for o in objs]
        assert xs == sorted(xs)
        for i, a in enumerate(objs):
            x0, y0, x1, y1 = a.box
            assert 0 <= x0 < x1 < w and 0 <= y0 < y1 < h
            assert x1 - x0 == y1 - y0  # square bounding box
            assert a.color in S.COLORS and a.shape in S.SHAPES
            assert all(abs(c - b) <= S.JITTER for c, b in zip(a.rgb, S.COLORS[a.color]))
            for b in objs[i + 1:]:
                assert abs(a.cx - b.cx) >= max(4.0, S.MIN_DX_FRAC * w)  # unambiguous order
                bx0, by0, bx1, by1 = b.box
                assert x1 < bx0 or bx1 < x0 or y1 < by0 or by1 < y0  # no bbox overlap
        labs = np.asarray(lab)
        assert set(np.unique(labs)) == set(range(len(objs) + 1))
        px = np.asarray(img)
        bg = px[labs == 0]
        assert (bg == bg[0]).all() and bg[0][0] >= 215 and bg[0][0] == bg[0][1] == bg[0][2]


def test_make_scene_deterministic():
    a = S.make_scene(random.Random("x"), 112)
    b = S.make_scene(random.Random("x"), 112)
    assert a[1] == b[1] and a[0].tobytes() == b[0].tobytes()


def test_heldout_questions():
    items = list(S.heldout_questions(50, seed=777))
    assert len(items) == 50
    assert [qt for _, _, _, qt in items] == S.QTYPES * 10
    again = list(S.heldout_questions(50, seed=777))
    assert [(q, a) for _, q, a, _ in items] == [(q, a) for _, q, a, _ in again]
    exist = [a for _, _, a, qt in items if qt == "exist"]
    assert exist.count("yes") == exist.count("no") == 5
    for img, _, a, _ in items:
        assert img.size == (112, 112)
        assert a == S.normalize_answer(a)
    # seeds are namespaced: held-out scenes are never training scenes
    assert S.heldout_rng(0, 3).random() != S.train_rng(0, 0, 3).random()
    sized = list(S.heldout_questions(5, seed=777, size=(200, 150)))
    assert sized[0][0].size == (200, 150)


def test_parse_question_round_trip():
    for qt in S.QTYPES:
        args = S.askable_args([], qt) or (S.SHAPES if qt == "color" else S.COLOR_NAMES)
        for a in args:
            assert S.parse_question(S.question_text(qt, a)) == (qt, a)
    assert S.parse_question("What is this?") is None
