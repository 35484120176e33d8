"""The `lightvlm` command: make-tiny and generate (--json), end to end in-process."""

from __future__ import annotations

import json

from PIL import Image

from lightvlm_core.cli import main
from lightvlm_core.engine import load_engine
from lightvlm_core.types import GenerationRequest, SamplingParams


def test_make_tiny_then_generate_json_matches_engine(tmp_path, capsys):
    model_dir = tmp_path / "tiny-qwen"
    assert main(["make-tiny", "--family", "qwen2_vl", "--out", str(model_dir)]) == 0
    capsys.readouterr()
    image_path = tmp_path / "scene.png"
    Image.new("RGB", (80, 60), (30, 90, 200)).save(image_path)
    args = ["generate", "--model", str(model_dir), "--device", "cpu", "--image", str(image_path),
            "--prompt", "What is this?", "--max-new-tokens", "6", "--preset", "none", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"text", "token_ids", "finish_reason", "usage", "timings"}
    assert set(out["usage"]) >= {"prompt_tokens", "completion_tokens", "image_tokens", "image_tokens_kept",
                                 "kv_cache_bytes"}
    assert set(out["timings"]) >= {"prefill_ms", "decode_ms", "tokens_per_second", "ttft_ms", "queue_ms"}
    engine = load_engine(str(model_dir), device="cpu")
    with Image.open(image_path) as img:
        ref = engine.generate([GenerationRequest("What is this?", [img.convert("RGB")],
                                                 SamplingParams(max_new_tokens=6))])[0]
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text


def test_generate_reports_errors_cleanly(tmp_path, capsys, tiny_model_dir):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    code = main(["generate", "--model", str(tiny_model_dir("llava")), "--device", "cpu", "--image", str(bad),
                 "--prompt", "hi"])
    assert code == 2  # a usage error, found before the model loads (README: exit status)
    assert "error:" in capsys.readouterr().err
