"""POST /generate over a fake engine: JSON and multipart bodies, SSE format, errors and limits."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_fakes import FakeEngine
from service_helpers import data_url, image_bytes, parse_sse

from lightvlm_core.types import AccelerationConfig

MakeClient = Callable[..., tuple[TestClient, FakeEngine]]


def assert_error(response: Any, status: int, error_type: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    return body["error"]


def test_sse_stream_format(client: TestClient) -> None:
    response = client.post(
        "/generate", json={"prompt": "what is here?", "image": data_url(image_bytes()), "max_new_tokens": 4}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = parse_sse(response.text)
    tokens, done = events[:-2], events[-2]
    assert [t["type"] for t in tokens] == ["token"] * 4
    assert [t["index"] for t in tokens] == [0, 1, 2, 3]
    assert all(set(t) == {"type", "index", "token_id", "text"} for t in tokens)
    assert done["type"] == "done" and done["finish_reason"] == "length"
    assert {
        "prompt_tokens",
        "completion_tokens",
        "image_tokens",
        "image_tokens_kept",
        "kv_cache_bytes",
    } <= set(done["usage"])
    assert {"queue_ms", "prefill_ms", "ttft_ms", "decode_ms", "tokens_per_second"} <= set(done["timings"])
    assert done["usage"]["completion_tokens"] == 4 and done["usage"]["image_tokens"] == 16


def test_non_streaming_json(client: TestClient) -> None:
    body = {"prompt": "describe [eos@3]", "image": base64.b64encode(image_bytes()).decode(), "stream": False}
    response = client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["finish_reason"] == "stop" and len(result["text"].split()) == 2  # the 3rd token is EOS
    assert result["usage"]["completion_tokens"] == 3 and "ttft_ms" in result["timings"]


def test_stream_equals_non_stream(client: TestClient) -> None:
    body = {"prompt": "same output", "image": data_url(image_bytes()), "max_new_tokens": 6}
    streamed = parse_sse(client.post("/generate", json=body).text)
    text = "".join(e["text"] for e in streamed if isinstance(e, dict) and e["type"] == "token")
    assert client.post("/generate", json={**body, "stream": False}).json()["text"] == text


def test_multipart_with_file_and_fields(make_client: MakeClient) -> None:
    client, engine = make_client()
    files = {"image": ("cat.jpg", image_bytes(fmt="JPEG"), "image/jpeg")}
    data = {
        "prompt": "what?",
        "max_new_tokens": "3",
        "stream": "false",
        "stop": ["zzz", "yyy"],
        "preset": "light",
        "keep_ratio": "0.5",
    }
    response = client.post("/generate", data=data, files=files)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["image_tokens"] == 16
    assert response.json()["usage"]["image_tokens_kept"] == 8
    assert engine.seen_accelerations[-1] == AccelerationConfig(preset="light", keep_ratio=0.5, kv_budget=None)


def test_multipart_streaming_and_acceleration_json(client: TestClient) -> None:
    data = {"prompt": "what?", "max_new_tokens": "2", "acceleration": json.dumps({"keep_ratio": 0.25})}
    response = client.post("/generate", data=data, files={"image": ("a.png", image_bytes(), "image/png")})
    assert response.status_code == 200 and parse_sse(response.text)[-1] == "[DONE]"


def test_text_only_request(client: TestClient) -> None:
    response = client.post("/generate", json={"prompt": "no image", "stream": False, "max_new_tokens": 2})
    assert response.status_code == 200 and response.json()["usage"]["image_tokens"] == 0


def test_stop_strings_end_generation(client: TestClient) -> None:
    full = client.post("/generate", json={"prompt": "p", "stream": False, "max_new_tokens": 8}).json()["text"]
    stop_word = full.split()[2]
    response = client.post(
        "/generate", json={"prompt": "p", "stream": False, "max_new_tokens": 8, "stop": [stop_word]}
    )
    assert response.json()["finish_reason"] == "stop"


def test_default_acceleration_is_engine_default(make_client: MakeClient) -> None:
    client, engine = make_client()
    client.post("/generate", json={"prompt": "x", "stream": False, "max_new_tokens": 1})
    client.post(
        "/generate",
        json={
            "prompt": "x",
            "stream": False,
            "max_new_tokens": 1,
            "acceleration": {"preset": "aggressive", "kv_budget": 32},
        },
    )
    assert engine.seen_accelerations[-2:] == [
        None,
        AccelerationConfig(preset="aggressive", keep_ratio=None, kv_budget=32),
    ]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": ""},
        {"prompt": "x", "max_new_tokens": 0},
        {"prompt": "x", "max_new_tokens": 10_000},  # over the server's LIGHTVLM_MAX_NEW_TOKENS
        {"prompt": "x", "temperature": -1},
        {"prompt": "x", "top_p": 0},
        {"prompt": "x", "top_k": -2},
        {"prompt": "x", "stop": "not-a-list"},
        {"prompt": "x", "unknown_field": 1},
        {"prompt": "x", "acceleration": {"preset": "warp-speed"}},
        {"prompt": "x", "acceleration": {"keep_ratio": 1.5}},
        {"prompt": "x", "stream": "maybe"},
    ],
)
def test_invalid_fields_are_422(client: TestClient, body: dict[str, Any]) -> None:
    error = assert_error(client.post("/generate", json=body), 422, "invalid_request")
    assert error["message"]


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")
    response = client.post("/generate", content=b"[1, 2]", headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_request")


def test_unsupported_content_type_is_415(client: TestClient) -> None:
    response = client.post("/generate", content=b"hello", headers={"content-type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type")


@pytest.mark.parametrize(
    "image",
    [
        "https://example.com/cat.png",
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
        "data:image/png;base64,!!!notbase64",
        "data:text/html;base64,PGh0bWw+",
        base64.b64encode(b"definitely not an image").decode(),
        data_url(image_bytes()[:40]),  # truncated PNG
    ],
)
def test_bad_images_are_400(client: TestClient, image: str) -> None:
    assert_error(client.post("/generate", json={"prompt": "x", "image": image}), 400, "invalid_image")


def test_image_limits(make_client: MakeClient) -> None:
    client, _ = make_client(max_image_bytes=2048, max_image_pixels=100 * 100)
    big_bytes = data_url(image_bytes(size=(90, 90), fmt="BMP"))  # ~24 kB
    assert (
        "larger than 2048 bytes"
        in assert_error(
            client.post("/generate", json={"prompt": "x", "image": big_bytes}), 400, "invalid_image"
        )["message"]
    )
    many_pixels = data_url(image_bytes(size=(200, 200)))  # small PNG, 40k pixels
    assert (
        "pixels"
        in assert_error(
            client.post("/generate", json={"prompt": "x", "image": many_pixels}), 400, "invalid_image"
        )["message"]
    )
    files = {"image": ("big.bmp", image_bytes(size=(90, 90), fmt="BMP"), "image/bmp")}
    assert_error(client.post("/generate", data={"prompt": "x"}, files=files), 400, "invalid_image")


def test_prompt_too_long_is_400(client: TestClient) -> None:
    assert_error(client.post("/generate", json={"prompt": "[too-long]"}), 400, "context_length_exceeded")


def test_body_too_large_is_413(make_client: MakeClient) -> None:
    client, _ = make_client(max_body_bytes=4096)
    response = client.post("/generate", json={"prompt": "x" * 10_000})
    assert_error(response, 413, "body_too_large")

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(10):
            yield b"x" * 1000

    response = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large")


def test_queue_full_is_429_with_retry_after(make_client: MakeClient) -> None:
    client, engine = make_client(engine=FakeEngine(step_delay=0.01), max_batch_size=1, max_queue=0)
    with client.stream("POST", "/generate", json={"prompt": "long", "max_new_tokens": 500}) as running:
        assert running.status_code == 200
        lines = running.iter_lines()  # keep a reference: a dropped iterator closes the stream
        next(lines)  # the first token: the request holds the only batch row
        response = client.post("/generate", json={"prompt": "another", "stream": False})
        assert_error(response, 429, "queue_full")
        assert int(response.headers["retry-after"]) >= 1


def test_failed_prefill_is_an_error_event_and_others_are_fine(client: TestClient) -> None:
    events = parse_sse(client.post("/generate", json={"prompt": "[add-fails]"}).text)
    assert (
        events[0]["type"] == "error"
        and events[0]["error_type"] == "internal_error"
        and events[-1] == "[DONE]"
    )
    assert_error(
        client.post("/generate", json={"prompt": "[add-fails]", "stream": False}), 500, "internal_error"
    )
    assert (
        client.post("/generate", json={"prompt": "fine", "stream": False, "max_new_tokens": 2}).status_code
        == 200
    )


def test_timeout(make_client: MakeClient) -> None:
    client, _ = make_client(engine=FakeEngine(step_delay=0.02), request_timeout_s=0.2)
    assert_error(
        client.post("/generate", json={"prompt": "slow", "max_new_tokens": 500, "stream": False}),
        504,
        "timeout",
    )
    events = parse_sse(client.post("/generate", json={"prompt": "slow", "max_new_tokens": 500}).text)
    assert events[-2]["type"] == "error" and events[-2]["error_type"] == "timeout"


def test_api_key(make_client: MakeClient) -> None:
    client, _ = make_client(api_key="s3cret")
    body = {"prompt": "x", "stream": False, "max_new_tokens": 1}
    assert_error(client.post("/generate", json=body), 401, "unauthorized")
    response = client.post("/generate", json=body, headers={"Authorization": "Bearer wrong"})
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert client.post("/generate", json=body, headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert_error(client.get("/v1/models"), 401, "unauthorized")
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200


def test_request_id_is_honoured_and_returned(client: TestClient) -> None:
    body = {"prompt": "x", "stream": False, "max_new_tokens": 1}
    response = client.post("/generate", json=body, headers={"X-Request-ID": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"
    # a client's id may repeat, so the generation gets a suffix
    assert response.json()["request_id"].startswith("abc-123-")
    response = client.post("/generate", json=body)
    assert response.json()["request_id"] == response.headers["x-request-id"]
    assert len(response.headers["x-request-id"]) == 32
    bad = "bad id\twith spaces"
    assert client.get("/health", headers={"X-Request-ID": bad}).headers["x-request-id"] != bad


def test_404_and_405_use_the_error_shape(client: TestClient) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/generate"), 405, "method_not_allowed")


def test_openapi_documents_generate(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert "GenerateRequest" in schema["components"]["schemas"]
    assert "AccelerationOverride" in schema["components"]["schemas"]
    content = schema["paths"]["/generate"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data"} <= set(content)
