"""Ray Serve scale-out benchmark on this machine: throughput with 1 vs 2 CPU replicas of the
bundled demo model (one thread each) in one run, and what Ray's HTTP proxy costs per request.

    .venv/bin/python scripts/bench_scaleout.py [--requests 64] [--concurrency 16] [--out FILE]

A local Ray cluster (head + one worker node, 1 CPU each, as in tests/scale) is started and stopped
by PID. Workload: /v1/chat/completions with a 96x96 image, greedy, `ignore_eos`, max_tokens
tokens each. Proxy cost: sequential requests through the proxy to a 1-replica deployment against
the same requests to a plain `lightvlm serve` (same code, same settings) on this machine,
alternating. Throughput rounds alternate 1 and 2 replicas (--rounds each); medians are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "scale"))
from ray_cluster import LocalRayCluster, free_port  # noqa: E402

DEMO_MODEL = str(ROOT / "models" / "shapes-demo")


def chat_body(index: int, max_tokens: int) -> dict[str, Any]:
    import base64
    import io

    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 96), "white")
    ImageDraw.Draw(img).ellipse((10 + index % 7, 20, 70, 80), fill=("red", "green", "blue")[index % 3])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"model": "shapes-demo", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "Describe the image."}]}]}


async def throughput(url: str, requests: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    bodies = [chat_body(i, max_tokens) for i in range(requests)]
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    replicas: Counter[str] = Counter()
    tokens = 0

    async def one(client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        nonlocal tokens
        async with gate:
            started = time.perf_counter()
            resp = await client.post(f"{url}/v1/chat/completions", json=body)
            resp.raise_for_status()
            latencies.append(time.perf_counter() - started)
            tokens += resp.json()["usage"]["completion_tokens"]
            replicas[resp.headers.get("x-lightvlm-replica", "?")] += 1

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, chat_body(i, max_tokens)) for i in range(concurrency)))  # warm
        latencies.clear()
        replicas.clear()
        tokens = 0
        started = time.perf_counter()
        await asyncio.gather(*(one(client, b) for b in bodies))
        wall = time.perf_counter() - started
    return {"requests": requests, "concurrency": concurrency, "wall_s": round(wall, 2),
            "requests_per_s": round(requests / wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "p50_latency_s": round(statistics.median(latencies), 3), "served_by": dict(replicas)}


def interleaved_ms(direct_url: str, proxied_url: str, count: int, request: Any) -> tuple[float, float]:
    """Median ms of `count` requests to each server, alternating between them (after 5 warm-up
    pairs), so that load from elsewhere on the machine hits both sides alike."""
    direct, proxied = [], []
    with httpx.Client(timeout=120) as client:
        for i in range(count + 5):
            for url, times in ((direct_url, direct), (proxied_url, proxied)):
                started = time.perf_counter()
                request(client, url).raise_for_status()
                if i >= 5:
                    times.append((time.perf_counter() - started) * 1000)
    return statistics.median(direct), statistics.median(proxied)


def wait_for_replicas(url: str, count: int, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if len(httpx.get(f"{url}/-/replicas", timeout=5).json()) == count:
                return
        time.sleep(1)
    raise TimeoutError(f"{count} replicas")


def health(client: httpx.Client, url: str) -> httpx.Response:
    return client.get(f"{url}/health")


def one_token(client: httpx.Client, url: str) -> httpx.Response:
    return client.post(f"{url}/v1/chat/completions", json=chat_body(0, 1))


def wait_ready(url: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    from ray import serve

    from app.scaleout.deployment import build_app

    cluster = LocalRayCluster(cpus_per_node=1)
    plain = None
    try:
        cluster.start()
        ray.init(address=cluster.address, namespace="serve", logging_level="WARNING")
        port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        settings = {"device": "cpu", "model": DEMO_MODEL, "max_batch_size": args.batch}
        result: dict[str, Any] = {"machine_note": "2-core machine shared with other engineers' jobs",
                                  "rounds": []}
        # 1, 2, 1, 2, ... replicas: only the replica count changes (Ray adds or stops one replica,
        # the other keeps running), so rounds alternate and drift on the machine hits both alike.
        for replicas in [1, 2] * args.rounds:
            serve.run(build_app({"settings": settings, "replicas": replicas}), name="lightvlm", route_prefix="/")
            wait_ready(url)
            wait_for_replicas(url, replicas)
            row = {"replicas": replicas, **asyncio.run(throughput(url, args.requests, args.concurrency,
                                                                 args.max_tokens))}
            result["rounds"].append(row)
            print(json.dumps(row), flush=True)
        for replicas in (1, 2):
            rates = [r["tokens_per_s"] for r in result["rounds"] if r["replicas"] == replicas]
            result[f"replicas_{replicas}_tokens_per_s_median"] = statistics.median(rates)
        result["speedup_2_vs_1"] = round(result["replicas_2_tokens_per_s_median"]
                                         / result["replicas_1_tokens_per_s_median"], 2)
        serve.run(build_app({"settings": settings, "replicas": 1}), name="lightvlm", route_prefix="/")
        wait_for_replicas(url, 1)
        plain_port = free_port()
        plain = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve", "--device", "cpu", "--model", DEMO_MODEL,
             "--port", str(plain_port)], env={**cluster.env, "LIGHTVLM_MAX_BATCH_SIZE": str(args.batch)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        plain_url = f"http://127.0.0.1:{plain_port}"
        wait_ready(plain_url)
        result["proxy_cost_ms"] = {}
        for kind, fn in (("GET /health", health), ("1-token chat completion", one_token)):
            direct, proxied = interleaved_ms(plain_url, url, args.sequential, fn)
            result["proxy_cost_ms"][kind] = {"direct": round(direct, 2), "through_ray": round(proxied, 2),
                                             "proxy": round(proxied - direct, 2)}
        print(json.dumps({"proxy_cost_ms": result["proxy_cost_ms"]}), flush=True)
        return result
    finally:
        if plain is not None and plain.poll() is None:
            plain.kill()
        if ray.is_initialized():
            ray.shutdown()
        cluster.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of every server")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of 1 then 2 replicas")
    parser.add_argument("--sequential", type=int, default=40, help="requests per proxy-cost measurement")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
