"""End to end: the service on loopback, a real Prometheus scraping it every second, and every
Grafana dashboard expression answered with data.

The service runs as users start it (`lightvlm serve`, bundled demo model, CPU). Prometheus comes
from Debian's `prometheus` package (installed by .ci/run). Traffic goes in two waves with a
scrape in between, so every histogram and counter shows an increase inside the 1m rate window
(a series born with its first observation shows none until the next one).
"""

from __future__ import annotations

import base64
import io
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import httpx
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from promql import DASHBOARD_METRICS, REPO_ROOT, dashboard_queries, exposed_series_names  # noqa: E402
from tools import free_port, require_tool, wait_until  # noqa: E402

pytestmark = pytest.mark.timeout(600)

DEMO_MODEL = REPO_ROOT / "models" / "shapes-demo"
LIGHTVLM = Path(sys.executable).with_name("lightvlm")


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Base URL of the service: E2E_SERVICE_URL (one already running, e.g. the compose stack or a
    GPU host), else `lightvlm serve` started here with the demo model on a free loopback port."""
    if os.environ.get("E2E_SERVICE_URL"):
        yield os.environ["E2E_SERVICE_URL"].rstrip("/")
        return
    if find_spec("app.main") is None:
        pytest.skip("the service (app/main.py) is not in the repo yet")
    if not (DEMO_MODEL / "config.json").is_file():
        pytest.skip("the bundled demo model is not in the repo yet")
    port = free_port()
    log = tmp_path_factory.mktemp("service") / "service.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTVLM_")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    argv = [str(LIGHTVLM), "serve", "--host", "127.0.0.1", "--port", str(port),
            "--model", str(DEMO_MODEL), "--device", "cpu"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"service exited with {proc.returncode}:\n{_tail(log)}")
        return httpx.get(f"{base}/ready", timeout=2).status_code == 200

    try:
        try:
            wait_until(ready, 240, "the service's /ready")
        except (AssertionError, RuntimeError) as e:
            pytest.fail(f"{e}\n--- service log ---\n{_tail(log)}")
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def prometheus(service: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require_tool("prometheus")
    workdir = tmp_path_factory.mktemp("prometheus")
    target = service.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "lightvlm", "static_configs": [{"targets": [target]}]}],
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    argv = [binary, f"--config.file={workdir / 'prometheus.yml'}", f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_until(lambda: httpx.get(f"{base}/-/ready", timeout=2).status_code == 200, 60,
                       "Prometheus /-/ready")
            wait_until(lambda: _instant(base, 'up{job="lightvlm"} == 1'), 60, "the service target to be up")
        except AssertionError as e:
            pytest.fail(f"{e}\n--- prometheus log ---\n{_tail(log)}")
        yield base
    finally:
        _stop(proc)


def _instant(prometheus: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, r.status_code, body)
    return body["data"]["result"]


def _scraped_after(prometheus: str, t: float) -> bool:
    """True once Prometheus holds a sample of the service taken after time t (unix seconds)."""
    result = _instant(prometheus, 'timestamp(up{job="lightvlm"})')
    return bool(result) and float(result[0]["value"][1]) > t + 0.5


def _image_data_url() -> str:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (112, 112), (240, 240, 240))
    draw = ImageDraw.Draw(img)
    draw.rectangle((20, 20, 50, 50), fill=(220, 30, 30))
    draw.ellipse((60, 60, 95, 95), fill=(30, 30, 220))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _wave(service: str, image: str) -> None:
    """Concurrent image requests (one with a tiny KV budget, to force eviction) and a rejection."""
    bodies = [
        {"prompt": "What shapes are in the picture?", "image": image, "max_new_tokens": 12,
         "ignore_eos": True, "stream": False},
        {"prompt": "What color is the circle?", "image": image, "max_new_tokens": 12,
         "ignore_eos": True, "stream": True},
        {"prompt": "How many shapes are there?", "image": image, "max_new_tokens": 16,
         "ignore_eos": True, "stream": False, "acceleration": {"kv_budget": 24}},
        {"prompt": "Describe the scene.", "image": image, "max_new_tokens": 12, "ignore_eos": True,
         "stream": False, "acceleration": {"preset": "aggressive"}},
    ]

    def send(body: dict) -> None:
        with httpx.Client(timeout=180) as client:
            r = client.post(f"{service}/generate", json=body)
            assert r.status_code == 200, (body.get("prompt"), r.status_code, r.text[:500])
            if body["stream"]:
                assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]

    with ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(send, bodies))
    bad = httpx.post(f"{service}/generate", json={"prompt": ""}, timeout=30)  # invalid field -> 422
    assert bad.status_code == 422, bad.text[:300]


@pytest.fixture(scope="module")
def traffic(service: str, prometheus: str) -> str:
    image = _image_data_url()
    _wave(service, image)
    t = time.time()
    wait_until(lambda: _scraped_after(prometheus, t), 30, "a scrape after the first wave")
    _wave(service, image)
    t = time.time()
    wait_until(lambda: _scraped_after(prometheus, t), 30, "a scrape after the second wave")
    return prometheus


# ---- before any traffic (these run first: the `traffic` fixture is not yet created) ------------


def test_metrics_right_after_start_show_every_dashboard_series_at_zero(service: str):
    """A new dashboard shows zeros, not "No data", before the first request (and before the
    first rejection: counters with known labels exist from the start)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{service}/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    names = {s.name for s in samples}
    assert exposed_series_names(DASHBOARD_METRICS) <= names, exposed_series_names(DASHBOARD_METRICS) - names
    for sample in samples:
        if sample.name.startswith("lightvlm_") and sample.name != "lightvlm_model_info":
            assert sample.value == 0, (sample.name, sample.labels, sample.value)
    rejected = {s.labels["reason"] for s in samples if s.name == "lightvlm_requests_rejected_total"}
    assert {"invalid_request", "queue_full", "unauthorized", "not_ready"} <= rejected


@pytest.mark.parametrize("query", dashboard_queries(), ids=[f"{q.panel}:{q.ref_id}" for q in dashboard_queries()])
def test_dashboard_expression_has_series_before_traffic(service: str, prometheus: str, query):
    # rate() needs two samples inside its window: wait for a few scrapes of the idle service.
    wait_until(lambda: _instant(prometheus, 'count_over_time(up{job="lightvlm"}[1m]) >= 3'), 30,
               "three scrapes of the idle service")
    result = _instant(prometheus, query.expr)
    assert result, f"no series (Grafana: 'No data') for {query.panel} / {query.legend}: {query.expr}"


# ---- with traffic --------------------------------------------------------------------------------


def test_metrics_endpoint_exposes_the_contract(service: str, traffic: str):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{service}/metrics", timeout=10).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in DASHBOARD_METRICS.items():
        assert name in families, f"/metrics lacks {name}"
        assert families[name].type == kind, (name, families[name].type, kind)
        labels = {k for s in families[name].samples for k in s.labels}
        assert "model" in labels, f"{name} has no `model` label"
    series = {s.name for f in families.values() for s in f.samples}
    assert exposed_series_names(DASHBOARD_METRICS) <= series, exposed_series_names(DASHBOARD_METRICS) - series


QUERIES = dashboard_queries()


@pytest.mark.parametrize("query", QUERIES, ids=[f"{q.panel}:{q.ref_id}" for q in QUERIES])
def test_dashboard_expression_returns_data(traffic: str, query):
    result = _instant(traffic, query.expr)
    assert result, f"no data for {query.panel} / {query.legend}: {query.expr}"
    values = [float(r["value"][1]) for r in result]
    assert all(math.isfinite(v) for v in values), (
        f"{query.panel} / {query.legend}: {values} for {query.expr}")
