"""`lightvlm make-scene` draws the scenes of examples/ (same seed, same pixels, same questions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lightvlm_core.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = json.loads((ROOT / "examples" / "questions.json").read_text())


@pytest.mark.parametrize("example", EXAMPLES, ids=[e["image"] for e in EXAMPLES])
def test_make_scene_reproduces_the_examples(example: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scene.png"
    assert main(["make-scene", "--out", str(out), "--seed", str(example["seed"]), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["questions"] == example["questions"] and printed["objects"] == example["objects"]
    with Image.open(out) as made, Image.open(ROOT / "examples" / example["image"]) as shipped:
        assert made.size == shipped.size == (224, 224)
        assert made.convert("RGB").tobytes() == shipped.convert("RGB").tobytes()


def test_make_scene_prints_questions_with_answers(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-scene", "--out", str(tmp_path / "s.png"), "--seed", "7", "--size", "112"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(str(tmp_path / "s.png") + ": ")
    assert any(line.strip().startswith("Describe the image.  ->  ") for line in lines[1:])
    with Image.open(tmp_path / "s.png") as img:
        assert img.size == (112, 112)
