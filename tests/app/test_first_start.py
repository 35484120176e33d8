"""What a new user sees right after start: every dashboard series exported (at 0) before any
traffic, and the model served under a public name (hub id or directory name, never a path)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_helpers import image_bytes, make_settings

from app.main import create_app
from app.metrics import FINISH_REASONS, REJECT_REASONS
from app.settings import served_name_of

ROOT = Path(__file__).resolve().parents[2]


def _series(text: str) -> set[str]:
    return {line.split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_known_series_are_exported_before_the_model_loads() -> None:
    app = create_app(make_settings(model=str(ROOT / "models" / "shapes-demo")))
    client = TestClient(app)  # no lifespan: the model never starts loading, as in the first seconds
    assert client.get("/ready").status_code == 503
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


def test_hub_download_notice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hub model missing from the cache is announced (offline here: size unknown); a cached one,
    a local directory and the bundled model are not."""
    import huggingface_hub.constants

    from app.hub_notice import download_notice

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    message = download_notice("Qwen/Qwen2.5-VL-3B-Instruct")
    assert message is not None and message.startswith("Qwen/Qwen2.5-VL-3B-Instruct is not in the local")
    assert "size unknown" in message  # the tests run with HF_HUB_OFFLINE=1
    snapshot = tmp_path / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "refs").mkdir()
    (tmp_path / "models--Qwen--Qwen2.5-VL-3B-Instruct" / "refs" / "main").write_text("abc123")
    assert download_notice("Qwen/Qwen2.5-VL-3B-Instruct") is None
    assert download_notice(None) is None and download_notice(str(ROOT / "models" / "shapes-demo")) is None


def test_kept_ratio_and_preprocess_are_observed_per_request(make_client) -> None:  # noqa: ANN001
    client, _ = make_client()
    image = "data:image/png;base64," + base64.b64encode(image_bytes()).decode()
    for stream in (False, True):
        response = client.post("/generate", json={"prompt": "x", "image": image, "stream": stream,
                                                  "max_new_tokens": 2})  # fmt: skip
        assert response.status_code == 200
    client.post("/generate", json={"prompt": "text only", "stream": False, "max_new_tokens": 2})
    text = client.get("/metrics").text
    assert 'lightvlm_image_tokens_kept_ratio_count{model="fake-vlm"} 2.0' in text  # text-only: not counted
    assert 'lightvlm_image_preprocess_seconds_count{model="fake-vlm"} 2.0' in text
