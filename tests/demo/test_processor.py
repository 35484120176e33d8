"""Fast tests for the demo tokenizer and processor (and that they match the training inputs)."""

import itertools
import random

import pytest
import torch

from lightvlm_core.demo import scenes as S
from lightvlm_core.demo.data import to_pixels
from lightvlm_core.demo.processor import (
    IMAGE_SEQ_LEN,
    UNK_ID,
    build_processor,
    encode_words,
    messages,
    prompt_ids,
)


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def all_answers():
    """Every non-describe answer, every 1-3 object description and a seeded sample of 4-object ones."""
    items = [f"{c} {s}" for c in S.COLOR_NAMES for s in S.SHAPES]
    out = set(S.COLOR_NAMES + S.SHAPES + S.NUMBERS + ["yes", "no"])
    for n in range(1, 4):
        for combo in itertools.product(items, repeat=n):
            out.add(combo[0] if n == 1 else ", ".join(combo[:-1]) + " and " + combo[-1])
    rng = random.Random(0)
    for _ in range(3000):
        combo = [rng.choice(items) for _ in range(4)]
        out.add(", ".join(combo[:-1]) + " and " + combo[-1])
    return sorted(out)


def all_questions():
    qs = []
    for qt in S.QTYPES:
        qs += [S.question_text(qt, a) for a in S.askable_args([], qt) or
               (S.SHAPES if qt == "color" else S.COLOR_NAMES)]
    return qs


def test_tokenizer_round_trips_every_answer(processor):
    tok = processor.tokenizer
    answers = all_answers()
    assert len(answers) > 15 + 15 + 15 ** 2 + 15 ** 3 + 2900
    enc = tok(answers, add_special_tokens=False)["input_ids"]
    dec = tok.batch_decode(enc)
    assert dec == answers
    # training-time pure-python encoder gives the same ids
    rng = random.Random(0)
    for i in rng.sample(range(len(answers)), 300) + list(range(30)):
        assert encode_words(answers[i]) == enc[i]
        assert UNK_ID not in enc[i]


def test_questions_in_vocabulary(processor):
    for q in all_questions():
        ids = processor.tokenizer.encode(q, add_special_tokens=False)
        assert UNK_ID not in ids and ids == encode_words(q)


@pytest.mark.parametrize("size", [112, (300, 200)])
def test_processor_matches_training_inputs(processor, size):
    rng = random.Random(5)
    img, objs = S.make_scene(rng, size)
    for qt in S.QTYPES:
        qa = S.sample_question(rng, objs, qt)
        if qa is None:
            continue
        q, a = qa
        text = processor.apply_chat_template(messages(q), add_generation_prompt=True)
        assert text == f"<s><|user|><image>{q}<|assistant|>"
        inp = processor(images=img, text=text, return_tensors="pt")
        assert inp["input_ids"][0].tolist() == prompt_ids(q)
        assert (inp["input_ids"][0] == 4).sum() == IMAGE_SEQ_LEN
        px = torch.from_numpy(to_pixels(img))
        # same resize + normalisation; resized images may differ by one uint8 level on a few pixels
        diff = (inp["pixel_values"][0] - px).abs()
        assert diff.max() < 0.03 and diff.mean() < 1e-3
