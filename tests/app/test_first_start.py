"""What a new user sees right after start: every dashboard series exported (at 0) before any
traffic, and the model served under a public name (hub id or directory name, never a path)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import make_settings

from app.main import create_app
from app.metrics import FINISH_REASONS, REJECT_REASONS
from app.settings import served_name_of

ROOT = Path(__file__).resolve().parents[2]


def _series(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_known_series_are_exported_before_the_model_loads() -> None:
    app = create_app(make_settings(model=str(ROOT / "models" / "shapes-demo")))
    with TestClient(app) as client:  # the lifespan starts loading; /metrics answers meanwhile
        series = _series(client.get("/metrics").text)
        for reason in REJECT_REASONS:
            assert f'lightvlm_requests_rejected_total{{model="shapes-demo",reason="{reason}"}}' in series
        for reason in FINISH_REASONS:
            assert f'lightvlm_requests_total{{finish_reason="{reason}",model="shapes-demo"}}' in series
        for name in ("image_preprocess_seconds", "image_tokens_kept_ratio", "prefill_seconds"):
            assert f'lightvlm_{name}_count{{model="shapes-demo"}}' in series
        assert not any("/" in s.split("model=")[-1] for s in series if "model=" in s), "a path leaked"


def test_fake_engine_rename_leaves_no_provisional_series(make_client) -> None:  # noqa: ANN001
    client, _ = make_client()
    client.get("/generate")  # a 405: counted under the served name
    text = client.get("/metrics").text
    assert 'lightvlm_requests_rejected_total{model="fake-vlm",reason="queue_full"} 0.0' in text
    assert 'lightvlm_requests_rejected_total{model="fake-vlm",reason="method_not_allowed"} 1.0' in text
    assert 'model="default"' not in text  # the provisional name's zero series are gone


@pytest.mark.parametrize(
    ("model", "name"),
    [
        (None, "shapes-demo"),
        ("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct"),
        (str(ROOT / "models" / "shapes-demo"), "shapes-demo"),
        (str(ROOT / "models" / "shapes-demo") + "/", "shapes-demo"),
        ("./models/shapes-demo", "shapes-demo"),
        ("/somewhere/not/here/my-vlm", "my-vlm"),
    ],
)
def test_served_name_is_never_a_path(model: str | None, name: str) -> None:
    assert served_name_of(model) == name
    settings = make_settings(model=model).with_default_served_name()
    assert settings.served_model_name == name
    assert make_settings(model=model, served_model_name="mine").with_default_served_name().served_model_name == "mine"
