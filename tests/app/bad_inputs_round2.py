"""The round-2 bad-input battery (issue 19): what a hostile client still broke after round 1, by
class, with the status and error type the service answers. Used by test_reliability_round2.py.

The server under test runs with LIMITS and ROUND2 settings (an API key among them); cases send
the key unless `auth` is False.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from bad_inputs import LIMITS, data_url, encode, noise

API_KEY = "round2-key"
# The read timeout leaves room for 70 bodies sent at once by one Python client on a loaded 2-core box.
ROUND2 = {"api_key": API_KEY, "body_read_timeout_s": 10.0, "max_incomplete_uploads": 64}
CHAT = "/v1/chat/completions"
BIG = 2**70


@dataclass
class Case:
    cls: int  # the class (1-9)
    name: str
    status: int
    error_type: str | None  # None for 200
    request: dict[str, Any] = field(default_factory=dict)  # httpx.request keyword arguments
    path: str = "/generate"
    method: str = "POST"
    auth: bool = True


def gen(prompt: str = "What is in the image?", **fields: Any) -> dict[str, Any]:
    return {"json": {"prompt": prompt, "max_new_tokens": 3, "stream": False, **fields}}


def chat(content: Any = "hi", **fields: Any) -> dict[str, Any]:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0, **fields}
    return {"json": body}


def chat_messages(messages: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"json": {"messages": messages, "max_tokens": 3, "temperature": 0, **fields}}


def raw(body: bytes | str, content_type: str = "application/json") -> dict[str, Any]:
    content = body.encode() if isinstance(body, str) else body
    return {"content": content, "headers": {"content-type": content_type}}


def form(**fields: str) -> dict[str, Any]:
    return {"data": {"prompt": "hi", "max_new_tokens": "3", "stream": "false", **fields}}


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def image_part() -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_url(encode(noise((24, 20))))}}


def numeric_cases() -> list[Case]:
    """Class 1: every numeric field has a range, so no value reaches the engine unchecked."""
    return [
        Case(1, "kv_budget 2^70", 422, "invalid_request", gen(acceleration={"kv_budget": BIG})),
        Case(1, "kv_budget 2^63", 422, "invalid_request", gen(acceleration={"kv_budget": 2**63})),
        Case(1, "kv_budget 2^31-1 (over the model's context)", 422, "invalid_request",
             gen(acceleration={"kv_budget": 2**31 - 1})),
        Case(1, "kv_budget 10^6 (over the model's context)", 422, "invalid_request",
             gen(acceleration={"kv_budget": 10**6})),
        Case(1, "kv_budget 2^70 (OpenAI route)", 422, "invalid_request", chat(acceleration={"kv_budget": BIG}), CHAT),
        Case(1, "kv_budget 64 (valid)", 200, None, gen(acceleration={"kv_budget": 64})),
        Case(1, "top_k 2^70", 422, "invalid_request", gen(top_k=BIG)),
        Case(1, "top_k 2^40 (OpenAI route)", 422, "invalid_request", chat(top_k=2**40), CHAT),
        Case(1, "max_new_tokens 2^70", 422, "invalid_request", gen(max_new_tokens=BIG)),
        Case(1, "max_tokens 2^64 (OpenAI route)", 422, "invalid_request", chat(max_tokens=2**64), CHAT),
        Case(1, "max_completion_tokens 2^31+1", 422, "invalid_request", chat(max_completion_tokens=2**31 + 1), CHAT),
        Case(1, "seed -1", 422, "invalid_request", gen(seed=-1)),
        Case(1, "seed 2^64 (OpenAI route)", 422, "invalid_request", chat(seed=2**64), CHAT),
        Case(1, "temperature 1e308", 422, "invalid_request", gen(temperature=1e308)),
        Case(1, "temperature 3 (OpenAI route)", 422, "invalid_request", chat(temperature=3), CHAT),
        Case(1, "keep_ratio 1e-400 (parses as 0.0)", 422, "invalid_request",
             raw('{"prompt": "a", "acceleration": {"keep_ratio": 1e-400}}')),
        Case(1, "keep_ratio 2", 422, "invalid_request", gen(acceleration={"keep_ratio": 2})),
        Case(1, "n = 0", 422, "invalid_request", chat(n=0), CHAT),
        Case(1, "n = 9 (over MAX_CHOICES)", 422, "invalid_request", chat(n=9), CHAT),
        Case(1, "n = 2^70", 422, "invalid_request", chat(n=BIG), CHAT),
        Case(1, "top_logprobs 21", 422, "invalid_request", chat(logprobs=True, top_logprobs=21), CHAT),
        Case(1, "top_logprobs 2^70 (/generate)", 422, "invalid_request", gen(top_logprobs=BIG)),
        Case(1, "multipart kv_budget 10^40", 422, "invalid_request", form(kv_budget="1" + "0" * 40)),
    ]  # fmt: skip


def cap_cases() -> list[Case]:
    """Class 2: the same caps on every route (stop strings, messages, content parts, images)."""
    alternating = [{"role": "user" if i % 2 == 0 else "assistant", "content": "hi"} for i in range(41)]
    two_images = [image_part(), image_part(), {"type": "text", "text": "and?"}]
    return [
        Case(2, "17 stop strings", 422, "invalid_request", gen(stop=[f"s{i}" for i in range(17)])),
        Case(2, "a 257-character stop string", 422, "invalid_request", gen(stop=["x" * 257])),
        Case(2, "150,000 stop strings (OpenAI route)", 422, "invalid_request",
             chat(stop=[str(i % 10) for i in range(150_000)]), CHAT),
        Case(2, "a 257-character stop string (OpenAI route)", 422, "invalid_request", chat(stop="y" * 257), CHAT),
        Case(2, "16 stop strings (OpenAI route, at the cap)", 200, None,
             chat(stop=[f"zz{i}" for i in range(16)]), CHAT),
        Case(2, "50,000 empty messages", 422, "invalid_request",
             chat_messages([{"role": "user", "content": ""}] * 50_000), CHAT),
        Case(2, "257 messages", 422, "invalid_request",
             chat_messages([{"role": "user", "content": "a"}] * 257), CHAT),
        Case(2, "41 alternating messages (valid)", 200, None, chat_messages(alternating), CHAT),
        Case(2, "65 content parts in one message", 422, "invalid_request",
             chat([{"type": "text", "text": "a"}] * 65), CHAT),
        Case(2, "50,000 empty text parts", 422, "invalid_request", chat([{"type": "text", "text": ""}] * 50_000), CHAT),
        Case(2, "6 images over 3 messages (limit 4)", 422, "invalid_request", chat_messages([
            {"role": "user", "content": two_images}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": two_images}, {"role": "assistant", "content": "ok"},
            {"role": "user", "content": two_images},
        ]), CHAT),
        Case(2, "prompt over max_prompt_chars (OpenAI route, split over parts)", 422, "invalid_request",
             chat([{"type": "text", "text": "x" * (LIMITS["max_prompt_chars"] // 2 + 1)}] * 2), CHAT),
    ]  # fmt: skip


def parse_cases() -> list[Case]:
    """Class 3: every malformed body is a 4xx, whatever the parser raises."""
    digits = "9" * 5000
    return [
        Case(3, "20,000 nested brackets", 422, "invalid_request", raw(nested(20_000))),
        Case(3, "20,000 nested brackets (OpenAI route)", 422, "invalid_request", raw(nested(20_000)), CHAT),
        Case(3, "nested 5,000 deep inside a field", 422, "invalid_request",
             raw('{"prompt": "a", "acceleration": ' + '{"a":' * 5000 + "1" + "}" * 5000 + "}")),
        Case(3, "5,000-digit integer", 422, "invalid_request", raw('{"prompt": "a", "seed": ' + digits + "}")),
        Case(3, "5,000-digit integer (OpenAI route)", 422, "invalid_request",
             raw('{"messages": [{"role": "user", "content": "a"}], "max_tokens": ' + digits + "}"), CHAT),
        Case(3, "float 1e5000 (infinity)", 422, "invalid_request", raw('{"prompt": "a", "temperature": 1e5000}')),
        Case(3, "multipart acceleration: 20,000 nested brackets", 422, "invalid_request",
             form(acceleration=nested(20_000))),
        Case(3, "multipart acceleration: 5,000-digit integer", 422, "invalid_request",
             form(acceleration='{"kv_budget": ' + digits + "}")),
        Case(3, "multipart seed: 5,000 digits", 422, "invalid_request", form(seed=digits)),
        Case(3, "multipart acceleration: not an object", 422, "invalid_request", form(acceleration="[1, 2]")),
        Case(3, "JSON array body (OpenAI route)", 422, "invalid_request", raw("[1, 2]"), CHAT),
        Case(3, "empty body (OpenAI route)", 422, "invalid_request", raw(b""), CHAT),
        Case(3, "text/plain (OpenAI route)", 415, "unsupported_media_type", raw("hi", "text/plain"), CHAT),
    ]  # fmt: skip


def openai_param_cases() -> list[Case]:
    """Class 5: what we do not implement is a 400, never silently ignored."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    return [
        Case(5, "tools + tool_choice required", 400, "invalid_request",
             chat(tools=[tool], tool_choice="required"), CHAT),
        Case(5, "tool_choice auto", 400, "invalid_request", chat(tool_choice="auto"), CHAT),
        Case(5, "response_format json_schema", 400, "invalid_request", chat(response_format=schema), CHAT),
        Case(5, "response_format json_object", 400, "invalid_request",
             chat(response_format={"type": "json_object"}), CHAT),
        Case(5, "functions", 400, "invalid_request", chat(functions=[tool["function"]]), CHAT),
        Case(5, "logit_bias", 400, "invalid_request", chat(logit_bias={"5": 10}), CHAT),
        Case(5, "frequency_penalty 0.5", 400, "invalid_request", chat(frequency_penalty=0.5), CHAT),
        Case(5, "presence_penalty -1", 400, "invalid_request", chat(presence_penalty=-1), CHAT),
        Case(5, "an unknown parameter", 400, "invalid_request", chat(foo=1), CHAT),
        Case(5, "top_logprobs without logprobs", 400, "invalid_request", chat(top_logprobs=3), CHAT),
        Case(5, "neutral values are accepted", 200, None, chat(
            user="u", metadata={}, tools=[], tool_choice="none", response_format={"type": "text"},
            frequency_penalty=0, presence_penalty=0.0, logit_bias={},
        ), CHAT),
    ]  # fmt: skip


def auth_cases() -> list[Case]:
    """Class 6: the key is checked first, on every route, before any body is read."""
    huge = {"messages": [{"role": "user", "content": "x" * (LIMITS["max_body_bytes"] - 1000)}]}
    return [
        Case(6, "no key, /generate", 401, "unauthorized", gen(), auth=False),
        Case(6, "no key, chat", 401, "unauthorized", chat(), CHAT, auth=False),
        Case(6, "no key, a body that would be a 422", 401, "unauthorized",
             raw('{"prompt": "a", "seed": ' + "9" * 5000 + "}"), auth=False),
        Case(6, "no key, a 2 MB body", 401, "unauthorized", raw(json.dumps(huge)), CHAT, auth=False),
        Case(6, "no key, nested brackets (OpenAI route)", 401, "unauthorized", raw(nested(20_000)), CHAT, auth=False),
        Case(6, "wrong key", 401, "unauthorized", {**chat(), "headers": {"Authorization": "Bearer nope"}}, CHAT,
             auth=False),
        Case(6, "no key, /v1/models", 401, "unauthorized", {}, "/v1/models", "GET", auth=False),
        Case(6, "no key, /openapi.json", 401, "unauthorized", {}, "/openapi.json", "GET", auth=False),
        Case(6, "no key, /docs", 401, "unauthorized", {}, "/docs", "GET", auth=False),
        Case(6, "no key, an unknown route", 401, "unauthorized", gen(), "/nope", auth=False),
    ]  # fmt: skip


def round2_cases() -> list[Case]:
    return numeric_cases() + cap_cases() + parse_cases() + openai_param_cases() + auth_cases()
