"""The playground's routes: the page, its static files, the sample scenes (the same as examples/)
and its config; none of them needs the API key, everything else still does."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


def test_page_and_static_files_need_no_key(make_client) -> None:  # noqa: ANN001
    client, _ = make_client(api_key="secret")
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/playground.js" in page.text and "http" not in page.text.split("<nav>")[0]  # no CDN
    for name, kind in (("playground.js", "text/javascript"), ("overlay.js", "text/javascript"),
                       ("playground.css", "text/css")):  # fmt: skip
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert client.get("/static/index.htm").status_code == 404
    assert client.get("/static/.hidden.js").status_code == 404
    assert client.get("/v1/models").status_code == 401  # the API itself still needs the key
    assert client.post("/generate", json={"prompt": "x"}).status_code == 401


def test_config_names_the_model_and_the_key_requirement(make_client) -> None:  # noqa: ANN001
    client, _ = make_client(api_key="secret", preset="light")
    config = client.get("/playground/config").json()
    assert config["model"] == "fake-vlm" and config["api_key_required"] is True and config["ready"] is True
    assert config["default_preset"] == "light" and "none" in config["presets"] and "balanced" in config["presets"]
    assert "Describe the image." in config["question_patterns"] and len(config["question_patterns"]) == 5
    open_client, _ = make_client()
    assert open_client.get("/playground/config").json()["api_key_required"] is False


def test_samples_are_the_examples(make_client) -> None:  # noqa: ANN001
    client, _ = make_client()
    samples = client.get("/playground/samples").json()
    examples = json.loads((ROOT / "examples" / "questions.json").read_text())
    assert [s["name"] + ".png" for s in samples] == [e["image"] for e in examples]
    for sample, example in zip(samples, examples):
        assert sample["questions"] == example["questions"] and sample["objects"] == example["objects"]
        served = Image.open(io.BytesIO(client.get(sample["url"]).content)).convert("RGB")
        with Image.open(ROOT / "examples" / example["image"]) as shipped:
            assert served.tobytes() == shipped.convert("RGB").tobytes()
    assert client.get("/playground/samples/scene-99.png").status_code == 404


def test_kept_patches_field_is_accepted(make_client) -> None:  # noqa: ANN001
    client, _ = make_client()
    response = client.post("/generate", json={"prompt": "x", "stream": False, "max_new_tokens": 1,
                                              "return_kept_patches": True})  # fmt: skip
    assert response.status_code == 200
    assert client.post("/generate", json={"prompt": "x", "return_kept_patches": "maybe"}).status_code == 422
