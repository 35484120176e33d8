"""/v1/chat/completions and /v1/models through the official `openai` client (fake engine)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from service_fakes import FakeEngine
from service_helpers import data_url, image_bytes, parse_sse

from app.requests import to_chat_messages
from app.schemas import ChatMessage
from lightvlm_core.types import AccelerationConfig

MakeClient = Callable[..., tuple[TestClient, FakeEngine]]


def openai_client(client: TestClient, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=api_key, http_client=client, max_retries=0)


def vision_message(
    text: str = "What shape is this?", color: tuple[int, int, int] = (0, 0, 255)
) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(image_bytes(color))}},
            {"type": "text", "text": text},
        ],
    }


def test_models_list(client: TestClient) -> None:
    models = openai_client(client).models.list()
    assert [m.id for m in models.data] == ["fake-vlm"]


def test_non_streaming_completion(client: TestClient) -> None:
    completion = openai_client(client).chat.completions.create(
        model="fake-vlm", messages=[vision_message()], max_tokens=5, temperature=0
    )
    assert completion.object == "chat.completion" and completion.model == "fake-vlm"
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and len(choice.message.content.split()) == 5
    assert choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 5


def test_streaming_with_usage_matches_non_streaming(client: TestClient) -> None:
    oai = openai_client(client)
    kwargs: dict[str, Any] = {
        "model": "fake-vlm",
        "messages": [vision_message()],
        "max_completion_tokens": 6,
        "temperature": 0,
    }
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert all(c.usage is None for c in chunks[:-1])
    assert text == oai.chat.completions.create(**kwargs).choices[0].message.content


def test_streaming_without_usage(client: TestClient) -> None:
    stream = openai_client(client).chat.completions.create(
        model="fake-vlm", messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    chunks = list(stream)
    assert all(c.choices for c in chunks) and chunks[-1].choices[0].finish_reason == "length"


def test_raw_sse_ends_with_done(client: TestClient) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    response = client.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(response.text)
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_stop_and_seed_and_extensions(make_client: MakeClient) -> None:
    client, engine = make_client()
    oai = openai_client(client)
    text = (
        oai.chat.completions.create(model="fake-vlm", messages=[vision_message()], max_tokens=8)
        .choices[0]
        .message.content
    )
    stopped = oai.chat.completions.create(
        model="fake-vlm",
        messages=[vision_message()],
        max_tokens=8,
        stop=text.split()[1],
        seed=7,
        top_p=0.9,
        extra_body={"top_k": 5, "acceleration": {"preset": "balanced"}},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert engine.seen_accelerations[-1] == AccelerationConfig(preset="balanced")


def test_errors_are_openai_errors(make_client: MakeClient) -> None:
    client, _ = make_client(api_key="k")
    oai = openai_client(client, api_key="k")
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as bad_image:
        oai.chat.completions.create(
            model="fake-vlm",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}],
                }
            ],
        )
    assert "not fetched" in bad_image.value.message
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="fake-vlm", messages=[], max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="fake-vlm", messages=[{"role": "user", "content": "x"}], n=99)
    with pytest.raises(openai.AuthenticationError):
        openai_client(client, api_key="wrong").models.list()


def test_error_mid_stream_raises_in_the_client(client: TestClient) -> None:
    stream = openai_client(client).chat.completions.create(
        model="fake-vlm", messages=[{"role": "user", "content": "[add-fails]"}], stream=True
    )
    with pytest.raises(openai.APIError, match="prefill failed"):
        list(stream)


def test_too_many_images_is_422(make_client: MakeClient) -> None:
    client, _ = make_client(max_images_per_request=1)
    body = {"messages": [{"role": "user", "content": vision_message()["content"] * 2}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422 and response.json()["error"]["type"] == "invalid_request"


def test_chat_messages_keep_roles_and_image_order() -> None:
    def msgs(*items: dict[str, Any]) -> list[ChatMessage]:
        return [ChatMessage.model_validate(m) for m in items]

    chat, text, urls = to_chat_messages(msgs(vision_message("What is it?")))
    assert text == "What is it?" and len(urls) == 1
    assert [p["type"] for p in chat[0]["content"]] == [p["type"].replace("image_url", "image")
                                                       for p in vision_message()["content"]]
    chat, _, _ = to_chat_messages(msgs({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}))
    assert [m["role"] for m in chat] == ["system", "user"]
    multi = msgs(
        {"role": "user", "content": "Colour?"},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "Shape?"}]},
    )
    chat, _, _ = to_chat_messages(multi)
    assert [(m["role"], m["content"][0]["text"]) for m in chat] == [
        ("user", "Colour?"), ("assistant", "Red."), ("user", "Shape?")]
    from app.errors import ServiceError

    with pytest.raises(ServiceError, match="last message"):
        to_chat_messages(msgs({"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}))
