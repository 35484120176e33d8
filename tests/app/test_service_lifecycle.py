"""Readiness, settings, metrics and client disconnects (fake engine; live uvicorn where it matters)."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_fakes import FakeEngine
from service_helpers import data_url, image_bytes, live_server, make_settings, wait_for

from app import service as service_module
from app.main import create_app
from app.settings import Settings, get_settings

MakeClient = Callable[..., tuple[TestClient, FakeEngine]]

# The metric contract lives beside the dashboard checks (tests/deploy/promql.py): one copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from promql import CONTRACT_METRICS  # noqa: E402


def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_ready_is_503_until_loaded_and_warmed_up(monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def slow_load(self: service_module.Service) -> FakeEngine:
        release.wait(10)
        return FakeEngine()

    monkeypatch.setattr(service_module.Service, "_load_engine", slow_load)
    with TestClient(create_app(make_settings(engine_process=False))) as client:
        assert client.get("/health").status_code == 200
        response = client.get("/ready")
        assert response.status_code == 503 and response.json()["error"]["type"] == "not_ready"
        generate = client.post("/generate", json={"prompt": "x"})
        assert generate.status_code == 503 and "retry-after" in generate.headers
        release.set()
        wait_for(lambda: client.get("/ready").status_code == 200)
        assert (
            client.post("/generate", json={"prompt": "x", "stream": False, "max_new_tokens": 1}).status_code
            == 200
        )


def test_failed_load_stays_unready_and_reports_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_load(self: service_module.Service) -> FakeEngine:
        raise FileNotFoundError("no safetensors in /nowhere")

    monkeypatch.setattr(service_module.Service, "_load_engine", broken_load)
    failures: list[BaseException] = []
    app = create_app(make_settings(engine_process=False))
    app.state.service.on_failure = failures.append
    with TestClient(app) as client:
        wait_for(lambda: app.state.service.state == "failed")
        assert "no safetensors" in client.get("/ready").json()["error"]["message"]
        assert client.get("/health").status_code == 200
    assert isinstance(failures[0], FileNotFoundError)


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIGHTVLM_MAX_BATCH_SIZE", "3")
    monkeypatch.setenv("LIGHTVLM_API_KEY", "abc")
    monkeypatch.setenv("LIGHTVLM_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("LIGHTVLM_CORS_ORIGINS", "https://a.example, https://b.example")
    settings = Settings()
    assert (
        settings.max_batch_size == 3
        and settings.api_key is not None
        and settings.api_key.get_secret_value() == "abc"
    )
    assert settings.log_level == "debug" and settings.cors_origin_list == [
        "https://a.example",
        "https://b.example",
    ]
    assert settings.scheduler_config().max_batch_size == 3
    assert "abc" not in repr(settings)
    get_settings.cache_clear()
    assert get_settings() is get_settings()
    get_settings.cache_clear()
    monkeypatch.setenv("LIGHTVLM_MAX_BATCH_SIZE", "0")
    with pytest.raises(ValueError):
        Settings()


def test_the_packed_weights_switch_is_checked_before_the_engine_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().packed_weights == "auto"
    for word, meaning in (("On", "true"), ("0", "false"), ("AUTO", "auto")):
        monkeypatch.setenv("LIGHTVLM_PACKED_WEIGHTS", word)
        assert Settings().packed_weights == meaning
    monkeypatch.setenv("LIGHTVLM_PACKED_WEIGHTS", "sometimes")
    with pytest.raises(ValueError, match="LIGHTVLM_PACKED_WEIGHTS must be auto, true or false"):
        Settings()


def test_cors_is_off_by_default_and_configurable(make_client: MakeClient) -> None:
    client, _ = make_client()
    assert (
        "access-control-allow-origin"
        not in client.get("/health", headers={"Origin": "https://a.example"}).headers
    )
    client, _ = make_client(cors_origins="https://a.example")
    headers = client.get("/health", headers={"Origin": "https://a.example"}).headers
    assert headers["access-control-allow-origin"] == "https://a.example"


def test_every_contract_metric_is_exposed_and_moves(make_client: MakeClient) -> None:
    client, _ = make_client()
    families = {f.name: f.type for f in text_string_to_metric_families(client.get("/metrics").text)}
    for name, kind in CONTRACT_METRICS.items():
        assert families.get(name) == kind, name
    before = scrape(client.get("/metrics").text)
    for _ in range(2):
        body = {"prompt": "count me", "image": data_url(image_bytes()), "max_new_tokens": 4, "stream": False}
        assert client.post("/generate", json=body).status_code == 200
    client.post("/generate", json={"prompt": ""})  # a 422
    after = scrape(client.get("/metrics").text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("lightvlm_requests_total", model="fake-vlm", finish_reason="length") == 2
    assert delta("lightvlm_generation_tokens_total") == 8
    assert delta("lightvlm_prompt_tokens_total") == 2 * (2 + 16)
    assert delta("lightvlm_image_tokens_total", stage="input") == 32
    assert delta("lightvlm_image_tokens_total", stage="kept") == 32
    assert delta("lightvlm_kv_cache_evicted_tokens_total") > 0
    assert delta("lightvlm_requests_rejected_total", reason="invalid_request") == 1
    for hist in (
        "prefill_seconds",
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "queue_time_seconds",
    ):
        assert delta(f"lightvlm_{hist}_count") == 2, hist
    assert delta("lightvlm_inter_token_latency_seconds_count") == 6
    assert delta("lightvlm_batch_size_count") >= 3
    for gauge in ("requests_running", "requests_waiting", "kv_cache_bytes", "kv_cache_tokens"):
        assert value(after, f"lightvlm_{gauge}") == 0, gauge
    assert (
        value(after, "lightvlm_model_info", model="fake-vlm", family="fake", preset="none", device="cpu") == 1
    )


def test_histogram_buckets_follow_vllm(client: TestClient) -> None:
    samples = scrape(client.get("/metrics").text)
    ttft_bounds = sorted(
        float(dict(ls)["le"])
        for (n, ls), _ in samples.items()
        if n == "lightvlm_time_to_first_token_seconds_bucket"
    )
    assert ttft_bounds[:3] == [0.001, 0.005, 0.01] and ttft_bounds[-2] == 2560.0
    e2e_bounds = sorted(
        float(dict(ls)["le"])
        for (n, ls), _ in samples.items()
        if n == "lightvlm_e2e_request_latency_seconds_bucket"
    )
    assert e2e_bounds[:2] == [0.3, 0.5] and e2e_bounds[-2] == 7680.0


def test_metrics_registries_are_per_app(make_client: MakeClient) -> None:
    first, _ = make_client()
    second, _ = make_client()
    first.post("/generate", json={"prompt": "x", "stream": False, "max_new_tokens": 1})
    assert value(scrape(first.get("/metrics").text), "lightvlm_requests_total") == 1
    assert value(scrape(second.get("/metrics").text), "lightvlm_requests_total") == 0


def test_client_disconnect_cancels_stream_and_frees_kv() -> None:
    engine = FakeEngine(step_delay=0.01)
    app = create_app(make_settings(), engine=engine)
    with live_server(app) as base_url:

        async def main() -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
                body = {"prompt": "endless", "max_new_tokens": 1000}
                async with http.stream("POST", "/generate", json=body) as response:
                    lines = response.aiter_lines()
                    assert (await anext(lines)).startswith("data: {")
                    assert engine.kv_cache_bytes() > 0
                # leaving the block closes the connection mid-stream

        asyncio.run(main())
        scheduler = app.state.service.scheduler
        wait_for(lambda: scheduler.stats().num_running == 0 and scheduler.stats().kv_cache_bytes == 0)
        assert not engine.rows
        samples = scrape(httpx.get(f"{base_url}/metrics").text)
        assert value(samples, "lightvlm_requests_total", finish_reason="cancelled") == 1
        assert (
            value(samples, "lightvlm_requests_running") == 0
            and value(samples, "lightvlm_kv_cache_bytes") == 0
        )


def test_client_disconnect_cancels_non_streaming_request() -> None:
    engine = FakeEngine(step_delay=0.01)
    app = create_app(make_settings(), engine=engine)
    with live_server(app) as base_url:
        body = {"prompt": "endless", "max_new_tokens": 1000, "stream": False}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base_url}/generate", json=body, timeout=0.5)
        scheduler = app.state.service.scheduler
        wait_for(lambda: scheduler.stats().num_running == 0)
        assert not engine.rows and scheduler.stats().kv_cache_bytes == 0
