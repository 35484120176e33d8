"""Fast tests for the demo tokenizer / processor, the packed training forward and the exported model."""

import itertools
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightvlm_core.demo import scenes as S
from lightvlm_core.demo import train as T
from lightvlm_core.demo.processor import (
    EOS_ID,
    IMAGE_SEQ_LEN,
    UNK_ID,
    build_processor,
    encode_words,
    messages,
    prompt_ids,
)

EXPORT_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes-demo"
SMALL = dict(T.DEFAULTS, vis_hidden=32, vis_layers=1, vis_heads=2, vis_mlp=64,
             txt_hidden=32, txt_layers=2, txt_heads=2, txt_kv_heads=1, txt_mlp=64)


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
        px = torch.from_numpy(T.to_pixels(img))
        # same resize + normalisation; resized images may differ by one uint8 level on a few pixels
        diff = (inp["pixel_values"][0] - px).abs()
        assert diff.max() < 0.03 and diff.mean() < 1e-3


def test_packed_forward_equals_hf_forward(processor):
    torch.manual_seed(0)
    model = T.build_model(SMALL).eval()
    rng = random.Random(11)
    imgs, qass = [], []
    for size in (112, (150, 200)):
        img, objs = S.make_scene(rng, size)
        imgs.append(img)
        qass.append(T.train_questions(rng, objs)[:4])
    pix = torch.from_numpy(np.stack([T.to_pixels(i) for i in imgs]))
    ids, pos, mask, sb, sp, st, sseg, nseg = T.pack(qass)
    with torch.no_grad():
        logits, _ = T.packed_forward(model, pix, ids, pos, mask, sb, sp)
    k = 0
    for img, qas in zip(imgs, qass):
        for q, a in qas:
            text = processor.apply_chat_template(messages(q), add_generation_prompt=True) + a + "</s>"
            inp = processor(images=img, text=text, return_tensors="pt")
            n = len(encode_words(a)) + 1
            assert inp["input_ids"][0, -n:].tolist() == st[k:k + n].tolist()
            with torch.no_grad():
                ref = model(**inp).logits[0, -n - 1:-1]
            assert torch.allclose(ref, logits[k:k + n], atol=1e-4)
            k += n
    assert k == len(st)
    assert st[-1].item() == EOS_ID


def test_aux_labels_shapes():
    ex = T.make_train_example(0, 0, 0, resize_prob=1.0)
    pix, lab, qas = ex
    assert pix.shape == (3, 112, 112)
    assert lab["color"].shape == (256,) and lab["centre"].sum() == lab["n_total"]
    assert set(np.unique(lab["rank"])) <= set(range(lab["n_total"] + 1))
    assert {q for q, _ in qas} >= {"Describe the image.", "How many circles are there?"}


def _generate_answers(model_dir, n):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    proc = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for img, q, a, qt in S.heldout_questions(n, seed=777, size=(140, 140)):
        text = proc.apply_chat_template(messages(q), add_generation_prompt=True)
        inp = proc(images=img, text=text, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**inp, max_new_tokens=16, do_sample=False)
        pred = proc.decode(gen[0, inp["input_ids"].shape[1]:], skip_special_tokens=True)
        out.append((pred, a, qt))
    return out


def test_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = T.build_model(SMALL)
    T.export(model, str(tmp_path / "m"), dict(step=0, steps=1, last_eval={"overall": 0.0}))
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "TRAINING.md", "processor_config.json"} <= files
    preds = _generate_answers(tmp_path / "m", 2)
    assert len(preds) == 2 and all(isinstance(p, str) for p, _, _ in preds)


@pytest.mark.skipif(not (EXPORT_DIR / "model.safetensors").exists(), reason="demo model not exported yet")
def test_shipped_model_loads_and_generates():
    size = (EXPORT_DIR / "model.safetensors").stat().st_size
    assert size < 40e6
    preds = _generate_answers(EXPORT_DIR, 20)  # 140x140 inputs: the processor's resize path
    assert all(isinstance(p, str) for p, _, _ in preds)
    md = (EXPORT_DIR / "TRAINING.md").read_text()
    m = re.search(r"full-model steps: (\d+) / (\d+)", md)
    if m and m.group(1) == m.group(2):  # training finished: the shipped model is at its >= 95% target
        acc = np.mean([S.answer_matches(p, a) for p, a, _ in preds])
        assert acc >= 0.9, preds


def test_warm_start_continues_an_exported_model(tmp_path):
    """``--init DIR`` loads the exported weights, skips phase 1 and keeps the command history."""
    torch.manual_seed(0)
    first = T.build_model(SMALL)
    first_cmd = "python -m lightvlm_core.demo.train --out runs/a --export A --seed 0 --steps 5"
    T.export(first, str(tmp_path / "A"), dict(step=5, steps=5, history=[first_cmd], last_eval={"overall": 0.0}))
    assert T.record_commands(T.read_record(str(tmp_path / "A"))) == [first_cmd]

    torch.manual_seed(1)
    second = T.build_model(SMALL)
    T.warm_start(second, str(tmp_path / "A"))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a.half().float(), b), name  # the export is fp16

    small = [f"{k}={SMALL[k]}" for k in ("vis_hidden", "vis_layers", "vis_heads", "vis_mlp", "txt_hidden",
                                         "txt_layers", "txt_heads", "txt_kv_heads", "txt_mlp")]
    T.main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "B"), "--init", str(tmp_path / "A"),
            "--seed", "1", "--steps", "2", "--set", *small, "batch=2", "n_eval=10"])
    md = (tmp_path / "B" / "TRAINING.md").read_text()
    assert "full-model steps: 2 / 2" in md and "phase 1 (vision tower + auxiliary heads only): 0 steps" in md
    cmds = T.record_commands(T.read_record(str(tmp_path / "B")))
    assert cmds[0] == first_cmd and "--init" in cmds[1] and len(cmds) == 2
    assert "## The warm-started model's own record" in md and "full-model steps: 0 / 5" in md

    T.main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "B"), "--resume", "--steps", "2"])
    # re-exporting a finished run is not a recipe step
    assert T.record_commands(T.read_record(str(tmp_path / "B"))) == cmds
