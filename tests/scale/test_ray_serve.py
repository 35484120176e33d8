"""Ray Serve on a real local cluster (head + worker node, separate processes on 127.0.0.1), with
the bundled demo model on CPU, one thread per replica.

`lightvlm serve --ray --replicas 2` is started against the cluster; requests go through Ray's HTTP
proxy with the official `openai` client and raw HTTP; a replica process is killed under load; an
autoscaling deployment grows under a burst and shrinks when idle.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[dev]' installs it)")

from ray_cluster import ROOT, LocalRayCluster, free_port, local_ray_cluster, pid_listening_on, replica_pids

openai = pytest.importorskip("openai")
from PIL import Image, ImageDraw  # noqa: E402

pytestmark = pytest.mark.timeout(900)
DEMO_MODEL = str(ROOT / "models" / "shapes-demo")
QUESTIONS = ("What color is the shape?", "What shape is it?", "How many shapes are there?", "Describe the image.")
COLORS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalRayCluster]:
    with local_ray_cluster(cpus_per_node=1) as c:
        yield c


class Server:
    """A `lightvlm serve` process (plain or --ray), stopped by PID."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # What `lightvlm serve` passes on as settings: redeploying with the same ones (only the
        # replica options changed) is a light update for Ray, without reloading models.
        self.settings = {"port": self.port, "model": DEMO_MODEL, "device": "cpu"}
        self.log = log
        command = [sys.executable, "-m", "app.cli", "serve", "--device", "cpu", "--model", DEMO_MODEL,
                   "--port", str(self.port), *args]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                         start_new_session=True)

    def wait_ready(self, timeout_s: float, replicas: int = 0) -> None:
        """Until /ready is 200 and, with `replicas`, that many replicas have answered it (a replica
        announces its metrics while its model still loads, and takes traffic only once loaded)."""
        deadline = time.monotonic() + timeout_s
        answered: set[str] = set()
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            try:
                resp = httpx.get(f"{self.url}/ready", timeout=5)
                if resp.status_code == 200:
                    answered.add(resp.headers.get("x-lightvlm-replica", ""))
                    if not replicas or len(answered & set(live_replicas(self.url))) >= replicas:
                        return
                    time.sleep(0.1)
                    continue
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(self.log.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def live_replicas(url: str) -> dict[str, str]:
    """replica id -> its metrics address, from the deployment's Prometheus HTTP-SD endpoint."""
    groups = httpx.get(f"{url}/-/replicas", timeout=10).json()
    return {g["labels"]["replica"]: g["targets"][0] for g in groups}


@pytest.fixture(scope="module")
def ray_server(cluster: LocalRayCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    server = Server(["--ray", "--replicas", "2"], env, tmp_path_factory.mktemp("ray") / "serve.log")
    try:
        server.wait_ready(timeout_s=400, replicas=2)
        yield server
    finally:
        server.stop()


def image_url(index: int) -> str:
    img = Image.new("RGB", (96, 96), "white")
    draw = ImageDraw.Draw(img)
    box = (16 + 4 * (index % 5), 20, 70, 74 - 3 * (index % 4))
    (draw.ellipse if index % 2 else draw.rectangle)(box, fill=COLORS[index % len(COLORS)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat_args(index: int) -> dict[str, Any]:
    content = [{"type": "image_url", "image_url": {"url": image_url(index)}},
               {"type": "text", "text": QUESTIONS[index % len(QUESTIONS)]}]
    # ignore_eos (a LightVLM extension): every answer is 24 tokens long, so the 64 overlap
    return {"model": "shapes-demo", "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, "extra_body": {"ignore_eos": True}}


async def ask(client: openai.AsyncOpenAI, index: int) -> tuple[str, str]:
    """(answer, replica) for request `index`: even ones stream, odd ones do not."""
    if index % 2:
        raw = await client.chat.completions.with_raw_response.create(**chat_args(index))
        return raw.parse().choices[0].message.content or "", raw.headers.get("x-lightvlm-replica", "")
    async with client.chat.completions.with_streaming_response.create(**chat_args(index), stream=True) as resp:
        text = "".join([c.choices[0].delta.content or "" async for c in await resp.parse() if c.choices])
        return text, resp.headers.get("x-lightvlm-replica", "")


async def ask_all(url: str, count: int) -> list[tuple[str, str]]:
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        return await asyncio.gather(*(ask(client, i) for i in range(count)))


def test_64_concurrent_openai_requests_match_a_single_server(ray_server: Server, cluster: LocalRayCluster,
                                                             tmp_path: Path) -> None:
    through_ray = asyncio.run(ask_all(ray_server.url, 64))
    single = Server([], cluster.env, tmp_path / "single.log")
    try:
        single.wait_ready(timeout_s=300)
        alone = asyncio.run(ask_all(single.url, 64))
    finally:
        single.stop()
    assert [text for text, _ in through_ray] == [text for text, _ in alone]
    assert all(text for text, _ in alone)
    served_by = Counter(replica for _, replica in through_ray)
    assert set(served_by) == set(live_replicas(ray_server.url)), served_by  # both replicas served some


def test_prometheus_discovers_and_scrapes_every_replica(ray_server: Server, tmp_path: Path) -> None:
    """deploy/ray/prometheus.yml as shipped (address and intervals shortened) with a real Prometheus."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not installed (apt-get install prometheus; .ci/run installs it)")
    config = yaml.safe_load((ROOT / "deploy" / "ray" / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "900ms"}
    (sd,) = config["scrape_configs"][0]["http_sd_configs"]
    sd.update(url=f"{ray_server.url}/-/replicas", refresh_interval="1s")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with open(tmp_path / "prometheus.log", "wb") as log:
        proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        found: set[str] = set()
        deadline = time.monotonic() + 90
        while len(found) < 2 and time.monotonic() < deadline:
            time.sleep(1)
            with contextlib.suppress(httpx.HTTPError, KeyError):
                result = httpx.get(f"http://127.0.0.1:{port}/api/v1/query", timeout=5,
                                   params={"query": "lightvlm_requests_waiting"}).json()["data"]["result"]
                found = {series["metric"].get("replica", "") for series in result}
        assert found == set(live_replicas(ray_server.url)), (found, (tmp_path / "prometheus.log").read_text()[-2000:])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def replica_metric(address: str, name: str) -> float:
    body = httpx.get(f"http://{address}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name + "{"))


def test_every_replica_exports_its_metrics_and_a_disconnect_cancels(ray_server: Server) -> None:
    replicas = live_replicas(ray_server.url)
    assert len(replicas) == 2
    for address in replicas.values():
        assert "lightvlm_requests_waiting" in httpx.get(f"http://{address}/metrics", timeout=10).text
    body = {"prompt": "Describe the image.", "max_new_tokens": 400, "ignore_eos": True, "stream": True}
    before = {r: replica_metric(a, "lightvlm_generation_tokens_total") for r, a in replicas.items()}
    with httpx.stream("POST", f"{ray_server.url}/generate", json=body, timeout=60) as resp:
        replica = resp.headers["x-lightvlm-replica"]
        events = resp.iter_lines()
        first = [next(events) for _ in range(4)]  # the stream streams: events arrive before it ends
        assert any(line.startswith("data:") for line in first)
        assert replica_metric(replicas[replica], "lightvlm_requests_running") == 1
    deadline = time.monotonic() + 15  # client gone: the replica must stop decoding for it
    while replica_metric(replicas[replica], "lightvlm_requests_running") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert replica_metric(replicas[replica], "lightvlm_requests_running") == 0
    generated = replica_metric(replicas[replica], "lightvlm_generation_tokens_total") - before[replica]
    assert generated < 400, generated


async def long_stream(client: httpx.AsyncClient, url: str, started: Callable[[], None] = lambda: None
                      ) -> tuple[str, str]:
    """('done' | 'error: ...', replica) of one long /generate stream; `started()` at its first event."""
    body = {"prompt": "Describe the image.", "max_new_tokens": 480, "ignore_eos": True, "stream": True}
    replica = ""
    try:
        async with client.stream("POST", f"{url}/generate", json=body) as resp:
            replica = resp.headers.get("x-lightvlm-replica", "")
            if resp.status_code != 200:
                return f"error: HTTP {resp.status_code}", replica
            last = ""
            async for line in resp.aiter_lines():
                if line.startswith("data:") and line[5:].strip() != "[DONE]":
                    if not last:
                        started()
                    last = json.loads(line[5:])["type"]
            return ("done" if last == "done" else f"error: stream ended after {last!r}"), replica
    except httpx.HTTPError as exc:
        return f"error: {type(exc).__name__}", replica


def test_killing_a_replica_under_load(ray_server: Server) -> None:
    before = live_replicas(ray_server.url)
    victim_id, victim_address = sorted(before.items())[0]
    victim = pid_listening_on(int(victim_address.rsplit(":", 1)[1]), replica_pids())
    assert victim is not None

    async def load_then_kill() -> list[tuple[str, str]]:
        # the kill lands once every stream is streaming (a fixed delay was outrun by a faster engine:
        # all 300-token streams had ended within 1.5 s)
        waiting = [12]
        all_started = asyncio.Event()

        def started() -> None:
            waiting[0] -= 1
            if not waiting[0]:
                all_started.set()

        async with httpx.AsyncClient(timeout=httpx.Timeout(60, read=30)) as client:
            streams = [asyncio.create_task(long_stream(client, ray_server.url, started)) for _ in range(12)]
            await asyncio.wait_for(all_started.wait(), timeout=60)
            os.kill(victim, signal.SIGKILL)
            return await asyncio.wait_for(asyncio.gather(*streams), timeout=90)  # no request hangs

    outcomes = asyncio.run(load_then_kill())
    on_victim = [o for o, r in outcomes if r == victim_id]
    elsewhere = [o for o, r in outcomes if r != victim_id]
    assert on_victim and all(o.startswith("error") for o in on_victim), outcomes
    assert all(o == "done" for o in elsewhere), outcomes
    after = asyncio.run(ask_all(ray_server.url, 8))  # later requests succeed
    assert all(text for text, _ in after)
    deadline = time.monotonic() + 240  # Ray starts a replacement replica
    while time.monotonic() < deadline:
        now = live_replicas(ray_server.url)
        if len(now) == 2 and victim_id not in now:
            break
        time.sleep(2)
    assert len(now) == 2 and victim_id not in now, now


def serve_status_replicas(address: str) -> int:
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=address, namespace="serve", logging_level="WARNING")
    deployments = serve.status().applications["lightvlm"].deployments
    return deployments["LightVLM"].replica_states.get("RUNNING", 0)


def test_autoscaling_up_under_a_burst_and_down_when_idle(ray_server: Server, cluster: LocalRayCluster) -> None:
    import ray
    from ray import serve

    from app.scaleout.deployment import build_app

    ray.init(address=cluster.address, namespace="serve", logging_level="WARNING")
    try:
        fast = {"upscale_delay_s": 1, "downscale_delay_s": 5, "look_back_period_s": 2, "metrics_interval_s": 0.5,
                "target_ongoing_requests": 2}
        serve.run(build_app({"settings": ray_server.settings, "replicas": 1, "max_replicas": 2,
                             "autoscaling": fast}), name="lightvlm", route_prefix="/")
        deadline = time.monotonic() + 240
        while serve_status_replicas(cluster.address) != 1 and time.monotonic() < deadline:
            time.sleep(1)
        assert serve_status_replicas(cluster.address) == 1

        async def burst() -> int:
            async with httpx.AsyncClient(timeout=httpx.Timeout(120)) as client:
                streams = [asyncio.create_task(long_stream(client, ray_server.url)) for _ in range(16)]
                peak, deadline = 1, time.monotonic() + 240
                while peak < 2 and time.monotonic() < deadline:
                    await asyncio.sleep(1)
                    peak = max(peak, await asyncio.to_thread(serve_status_replicas, cluster.address))
                    if all(s.done() for s in streams):  # keep the burst going until it scaled
                        streams = [asyncio.create_task(long_stream(client, ray_server.url)) for _ in range(16)]
                await asyncio.gather(*streams)
                return peak

        assert asyncio.run(burst()) == 2
        deadline = time.monotonic() + 180
        while serve_status_replicas(cluster.address) != 1 and time.monotonic() < deadline:
            time.sleep(2)
        assert serve_status_replicas(cluster.address) == 1
    finally:
        ray.shutdown()


def test_a_full_proxy_queue_answers_429(ray_server: Server, cluster: LocalRayCluster) -> None:
    import ray
    from ray import serve

    from app.scaleout.deployment import build_app

    ray.init(address=cluster.address, namespace="serve", logging_level="WARNING")
    try:  # one replica admitting one batch of 8 (the default), at most 2 more waiting in the proxy
        serve.run(build_app({"settings": ray_server.settings, "replicas": 1, "max_queued_requests": 2}),
                  name="lightvlm", route_prefix="/")

        async def flood() -> list[httpx.Response]:
            body = {"prompt": "Describe the image.", "max_new_tokens": 200, "ignore_eos": True, "stream": False}
            async with httpx.AsyncClient(timeout=300) as client:
                return await asyncio.gather(*(client.post(f"{ray_server.url}/generate", json=body)
                                              for _ in range(16)))

        responses = asyncio.run(flood())
        # Ray's bound counts requests not yet handed to a replica, so part of a sudden burst is
        # refused even while the replica still has free rows: some 200s, the rest 429, nothing else.
        codes = Counter(r.status_code for r in responses)
        assert set(codes) == {200, 429}, codes
        rejected = next(r for r in responses if r.status_code == 429)
        assert int(rejected.headers["retry-after"]) >= 1
    finally:
        ray.shutdown()
