"""Tests for the demo training code: the packed forward, the training data, the export and its
record, warm start and resume, and the recipe's schedules."""

import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from lightvlm_core.demo import scenes as S
from lightvlm_core.demo import train
from lightvlm_core.demo.data import make_train_example, to_pixels, train_questions
from lightvlm_core.demo.model import build_model, packed_forward, warm_start
from lightvlm_core.demo.packing import pack
from lightvlm_core.demo.processor import EOS_ID, build_processor, encode_words, messages
from lightvlm_core.demo.recipe import DEFAULTS, aux_weight, lr_at
from lightvlm_core.demo.record import export, read_record, record_commands

EXPORT_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes-demo"
SMALL = dict(DEFAULTS, vis_hidden=32, vis_layers=1, vis_heads=2, vis_mlp=64,
             txt_hidden=32, txt_layers=2, txt_heads=2, txt_kv_heads=1, txt_mlp=64)
SMALL_SET = [f"{k}={SMALL[k]}" for k in ("vis_hidden", "vis_layers", "vis_heads", "vis_mlp", "txt_hidden",
                                         "txt_layers", "txt_heads", "txt_kv_heads", "txt_mlp")]


@pytest.fixture(scope="module")
def processor():
    return build_processor()


def test_packed_forward_equals_hf_forward(processor):
    torch.manual_seed(0)
    model = build_model(SMALL).eval()
    rng = random.Random(11)
    imgs, qass = [], []
    for size in (112, (150, 200)):
        img, objs = S.make_scene(rng, size)
        imgs.append(img)
        qass.append(train_questions(rng, objs)[:4])
    pix = torch.from_numpy(np.stack([to_pixels(i) for i in imgs]))
    ids, pos, mask, sb, sp, st, sseg, nseg = pack(qass)
    with torch.no_grad():
        logits, _ = packed_forward(model, pix, ids, pos, mask, sb, sp)
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
    ex = make_train_example(0, 0, 0, resize_prob=1.0)
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
    model = build_model(SMALL)
    export(model, str(tmp_path / "m"), dict(step=0, steps=1, last_eval={"overall": 0.0}))
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
    first = build_model(SMALL)
    first_cmd = "python -m lightvlm_core.demo.train --out runs/a --export A --seed 0 --steps 5"
    export(first, str(tmp_path / "A"), dict(step=5, steps=5, history=[first_cmd], last_eval={"overall": 0.0}))
    assert record_commands(read_record(str(tmp_path / "A"))) == [first_cmd]

    torch.manual_seed(1)
    second = build_model(SMALL)
    warm_start(second, str(tmp_path / "A"))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a.half().float(), b), name  # the export is fp16

    train.main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "B"), "--init", str(tmp_path / "A"),
            "--seed", "1", "--steps", "2", "--set", *SMALL_SET, "batch=2", "n_eval=10"])
    md = (tmp_path / "B" / "TRAINING.md").read_text()
    assert "full-model steps: 2 / 2" in md and "phase 1 (vision tower + auxiliary heads only): 0 steps" in md
    cmds = record_commands(read_record(str(tmp_path / "B")))
    assert cmds[0] == first_cmd and "--init" in cmds[1] and len(cmds) == 2
    assert "## The warm-started model's own record" in md and "full-model steps: 0 / 5" in md

    train.main(["--out", str(tmp_path / "run"), "--export", str(tmp_path / "B"), "--resume", "--steps", "2"])
    # re-exporting a finished run is not a recipe step
    assert record_commands(read_record(str(tmp_path / "B"))) == cmds


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    """Phase 1, phase 2 with the LLM-side head and extra questions: stopping after one phase-2 step and
    resuming gives the same weights, byte for byte, as training straight through."""
    # warm-up (60 steps) outlasts the run and the aux weight is constant, so the step budget
    # (1 then 3, or 3) does not change the schedules
    recipe = ["--set", *SMALL_SET, "batch=2", "n_eval=5", "vision_steps=1", "llm_aux_w=0.5", "llm_aux_layer=1",
              "extra_qa=1", "aux_w0=0.5", "aux_w1=0.5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train.main(["--out", str(tmp_path / "r1"), "--export", str(straight), "--seed", "4", "--steps", "3", *recipe])
    train.main(["--out", str(tmp_path / "r2"), "--export", str(resumed), "--seed", "4", "--steps", "1", *recipe])
    train.main(["--out", str(tmp_path / "r2"), "--export", str(resumed), "--resume", "--steps", "3"])
    md = (resumed / "TRAINING.md").read_text()
    assert "phase 1 (vision tower + auxiliary heads only): 1 steps" in md and "full-model steps: 3 / 3" in md
    assert len(record_commands(read_record(str(resumed)))) == 2
    assert (straight / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()


def test_schedules():
    cfg = dict(DEFAULTS, vis_lr=1.0, vis_warmup=4, lr=2.0, warmup=10, min_lr_frac=0.1, aux_w0=1.0, aux_w1=0.2)
    assert [lr_at(s, cfg, 100, None) for s in (0, 3, 50)] == [0.25, 1.0, 1.0]  # phase 1: warm-up, then flat
    # phase 2 from step 20: linear warm-up, cosine decay to min_lr_frac * lr at the end of the budget
    assert lr_at(20, cfg, 100, 20) == pytest.approx(0.2) and lr_at(29, cfg, 100, 20) == pytest.approx(2.0)
    assert lr_at(120, cfg, 100, 20) == pytest.approx(0.2) and lr_at(500, cfg, 100, 20) == pytest.approx(0.2)
    lrs = [lr_at(s, cfg, 100, 20) for s in range(29, 121)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    # aux weight: 1 in phase 1; aux_w0 -> aux_w1 over the first half of phase 2, then constant
    assert aux_weight(7, cfg, 100, None) == 1.0
    assert aux_weight(20, cfg, 100, 20) == pytest.approx(1.0) and aux_weight(70, cfg, 100, 20) == pytest.approx(0.2)
    assert aux_weight(95, cfg, 100, 20) == pytest.approx(0.2)
