"""Soak: many concurrent greedy streams against `lightvlm serve`, each checked against the same
request run alone, with memory and the idle gauges checked afterwards.

    python tests/app/soak.py --requests 500 --concurrency 32 [--model DIR] [--out summary.json]

The service runs as its own process (`python -m app.cli serve`, CPU unless --device
says otherwise). Requests mix /generate SSE (80%) and streaming /v1/chat/completions (20%), scene
images of several sizes and formats, the demo questions or free prompts, 4-24 new tokens and
three acceleration settings, all greedy. Every output is compared with an in-process engine
running that request alone (same decoded image, same chat messages). RSS of the server process is
sampled after a warm-up round, during the run (peak) and once idle; `lightvlm_kv_cache_bytes`,
`_tokens`, `requests_running` and `requests_waiting` must read 0 once idle. Prints one JSON
summary; exits 1 if anything was lost, garbled, mismatched or failed, or RSS grew too much.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
DEMO_MODEL = ROOT / "models" / "shapes-demo"
FREE_PROMPTS = [
    "Describe the image.",
    "What shapes do you see?",
    "What color is the largest object?",
    "How many objects are there?",
    "Is there anything on the left?",
]
ACCELERATIONS: list[dict[str, Any] | None] = [None, {"preset": "light"}, {"preset": "balanced", "kv_budget": 64}]


@dataclass
class Spec:
    """One soak request: what is sent, and what it must produce."""

    index: int
    route: str  # "generate" | "chat"
    prompt: str
    image: bytes  # encoded file
    mime: str
    max_new_tokens: int
    acceleration: dict[str, Any] | None
    expected_ids: list[int] = field(default_factory=list)
    expected_text: str = ""

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.image).decode()}"

    def body(self) -> dict[str, Any]:
        if self.route == "generate":
            body: dict[str, Any] = {"prompt": self.prompt, "image": self.data_url(),
                                    "max_new_tokens": self.max_new_tokens}  # fmt: skip
        else:
            content = [{"type": "image_url", "image_url": {"url": self.data_url()}},
                       {"type": "text", "text": self.prompt}]  # fmt: skip
            body = {"messages": [{"role": "user", "content": content}], "stream": True,
                    "max_tokens": self.max_new_tokens, "temperature": 0}  # fmt: skip
        if self.acceleration is not None:
            body["acceleration"] = self.acceleration
        return body


def make_specs(n: int, demo_questions: bool, seed: int = 0) -> list[Spec]:
    from lightvlm_core.demo.scenes import QTYPES, askable_args, make_scene, sample_question

    rng = random.Random(seed)
    sizes = [112, (96, 128), (160, 120), (64, 64), (200, 150)]
    specs = []
    for i in range(n):
        image, objs = make_scene(rng, rng.choice(sizes))
        if demo_questions:
            qtypes = [q for q in QTYPES if q == "describe" or askable_args(objs, q)]
            prompt = sample_question(rng, objs, rng.choice(qtypes))[0]
        else:
            prompt = rng.choice(FREE_PROMPTS)
        fmt = rng.choice(["PNG", "PNG", "JPEG", "GREY"])
        buf = io.BytesIO()
        if fmt == "GREY":
            image.convert("L").save(buf, format="PNG")
        else:
            image.save(buf, format=fmt)
        specs.append(Spec(
            index=i, route="chat" if rng.random() < 0.2 else "generate", prompt=prompt, image=buf.getvalue(),
            mime="image/jpeg" if fmt == "JPEG" else "image/png", max_new_tokens=rng.randint(4, 24),
            acceleration=rng.choice(ACCELERATIONS),
        ))  # fmt: skip
    return specs


def compute_references(model: str, device: str, specs: list[Spec]) -> float:
    """Run every spec alone through an in-process engine (the same intake as the service)."""
    import torch

    from app.images import decode_image_bytes
    from lightvlm_core.engine import load_engine
    from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

    torch.set_num_threads(1)
    engine = load_engine(model, device=device)
    started = time.monotonic()
    for spec in specs:
        image = decode_image_bytes(spec.image, max_pixels=4096 * 4096)
        acc = spec.acceleration
        acceleration = None if acc is None else AccelerationConfig(acc["preset"], kv_budget=acc.get("kv_budget"))
        request = GenerationRequest(
            prompt=spec.prompt,
            images=[image],
            sampling=SamplingParams(max_new_tokens=spec.max_new_tokens),
            acceleration=acceleration,
            messages=None if spec.route == "generate" else [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": spec.prompt}]}
            ],
        )  # fmt: skip
        (result,) = engine.generate([request])
        spec.expected_ids, spec.expected_text = result.token_ids, result.text
    return time.monotonic() - started


@dataclass
class Outcome:
    ok: bool = False
    error: str | None = None  # HTTP status / error event / exception
    lost: bool = False  # no final done/[DONE], or tokens missing or out of order
    mismatch: bool = False
    tokens: int = 0


async def run_one(http: httpx.AsyncClient, spec: Spec) -> Outcome:
    path = "/generate" if spec.route == "generate" else "/v1/chat/completions"
    outcome = Outcome()
    payloads: list[str] = []
    try:
        async with http.stream("POST", path, json=spec.body()) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return outcome
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    payloads.append(line[len("data: ") :])
    except httpx.HTTPError as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
        return outcome
    if not payloads or payloads[-1] != "[DONE]":
        outcome.lost = True
        return outcome
    events = [json.loads(p) for p in payloads[:-1]]
    errors = [e for e in events if e.get("type") == "error" or "error" in e]
    if errors:
        outcome.error = f"error event: {errors[0]}"
        return outcome
    if spec.route == "generate":
        tokens = [e for e in events if e["type"] == "token"]
        done = [e for e in events if e["type"] == "done"]
        if len(done) != 1 or events[-1] is not done[0] or [t["index"] for t in tokens] != list(range(len(tokens))):
            outcome.lost = True
            return outcome
        outcome.tokens = len(tokens)
        outcome.mismatch = [t["token_id"] for t in tokens] != spec.expected_ids
    else:
        chunks = [e for e in events if e.get("choices")]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        if len(finish) != 1:
            outcome.lost = True
            return outcome
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        outcome.tokens = len(spec.expected_ids)
        outcome.mismatch = text != spec.expected_text
    outcome.ok = not outcome.mismatch
    return outcome


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def scrape(base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{base_url}/metrics", timeout=10).text):
        for s in family.samples:
            label = s.labels.get("finish_reason")
            key = s.name + (f"{{{label}}}" if label else "")
            totals[key] = totals.get(key, 0.0) + s.value
    return totals


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hardware() -> dict[str, Any]:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def resolve_model(model: str | None, workdir: Path) -> tuple[str, bool]:
    """(model to serve, is it the demo model). A local directory is copied first, so that the
    references and the server read the same weights even if the directory is rewritten meanwhile
    (the demo model is re-exported while it trains)."""
    if not model and not (DEMO_MODEL / "model.safetensors").exists():
        from lightvlm_core.tiny import make_tiny

        return str(make_tiny("llava", workdir / "tiny-llava")), False
    source = Path(model) if model else DEMO_MODEL
    if not source.is_dir():
        return str(model), False  # a hub id
    snapshot = workdir / "model"
    shutil.copytree(source, snapshot)
    return str(snapshot), source.resolve() == DEMO_MODEL.resolve()


async def drive(
    base_url: str, specs: list[Spec], concurrency: int, pid: int
) -> tuple[list[Outcome], int, list[tuple[int, int]]]:
    """Send the specs with at most `concurrency` in flight; returns the outcomes, the peak RSS and
    (requests completed, RSS) at every tenth of the run."""
    semaphore = asyncio.Semaphore(concurrency)
    peak = rss_bytes(pid)
    running = True
    completed = 0
    series: list[tuple[int, int]] = []
    every = max(1, len(specs) // 10)

    async def sample() -> None:
        nonlocal peak
        while running:
            peak = max(peak, rss_bytes(pid))
            await asyncio.sleep(0.25)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:

        async def bounded(spec: Spec) -> Outcome:
            nonlocal completed
            async with semaphore:
                outcome = await run_one(http, spec)
            completed += 1
            if completed % every == 0:
                series.append((completed, rss_bytes(pid)))
            return outcome

        sampler = asyncio.create_task(sample())
        try:
            outcomes = await asyncio.gather(*(bounded(s) for s in specs))
        finally:
            running = False
            await sampler
    return outcomes, peak, series


def run_soak(
    requests: int = 500,
    concurrency: int = 32,
    model: str | None = None,
    device: str = "cpu",
    max_batch_size: int = 8,
    max_rss_growth_mb: float = 64.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the soak; its work directory (model snapshot, server log) is removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="lightvlm-soak-") as tmp:
        return _run_soak_in(Path(tmp), requests, concurrency, model, device, max_batch_size,
                            max_rss_growth_mb, seed)  # fmt: skip


def _run_soak_in(
    workdir: Path,
    requests: int,
    concurrency: int,
    model: str | None,
    device: str,
    max_batch_size: int,
    max_rss_growth_mb: float,
    seed: int,
) -> dict[str, Any]:
    source = model or str(DEMO_MODEL)
    model, demo = resolve_model(model, workdir)
    warmup_specs = make_specs(concurrency, demo, seed=seed + 1)
    specs = make_specs(requests, demo, seed=seed)
    reference_s = compute_references(model, device, warmup_specs + specs)

    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LIGHTVLM_API_KEY": "", "LIGHTVLM_MAX_BATCH_SIZE": str(max_batch_size),
           "LIGHTVLM_MAX_QUEUE": str(max(64, concurrency)), "LIGHTVLM_PRESET": "none",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # fmt: skip
    command = [sys.executable, "-m", "app.cli", "serve", "--model", model, "--device", device,
               "--port", str(port)]  # fmt: skip
    log_path = workdir / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base_url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        rss_ready = rss_bytes(server.pid)
        warm, _, _ = asyncio.run(drive(base_url, warmup_specs, concurrency, server.pid))
        before_metrics = scrape(base_url)
        rss_before = rss_bytes(server.pid)
        started = time.monotonic()
        outcomes, rss_peak, rss_series = asyncio.run(drive(base_url, specs, concurrency, server.pid))
        duration = time.monotonic() - started
        time.sleep(0.5)  # the engine thread publishes its last stats after the final events
        idle = scrape(base_url)
        rss_after = rss_bytes(server.pid)
        server.send_signal(signal.SIGTERM)
        exit_code = server.wait(60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()

    mib = 1024 * 1024
    failed = [(s.index, o.error) for s, o in zip(specs, outcomes) if o.error]
    lost = [s.index for s, o in zip(specs, outcomes) if o.lost]
    mismatched = [s.index for s, o in zip(specs, outcomes) if o.mismatch]
    idle_gauges = {name: idle[f"lightvlm_{name}"] for name in
                   ("kv_cache_bytes", "kv_cache_tokens", "requests_running", "requests_waiting")}  # fmt: skip
    finished = {reason: idle.get(f"lightvlm_requests_total{{{reason}}}", 0) - before_metrics.get(
        f"lightvlm_requests_total{{{reason}}}", 0) for reason in ("stop", "length", "cancelled", "error")}  # fmt: skip
    growth_mb = (rss_after - rss_before) / mib
    summary = {
        "model": source if Path(source).is_dir() else model,
        "device": device,
        "requests": requests,
        "concurrency": concurrency,
        "max_batch_size": max_batch_size,
        "routes": {r: sum(1 for s in specs if s.route == r) for r in ("generate", "chat")},
        "warmup_requests": len(warmup_specs),
        "warmup_errors": sum(1 for o in warm if not o.ok),
        "errors": len(failed),
        "lost_or_garbled": len(lost),
        "mismatches": len(mismatched),
        "error_examples": failed[:3],
        "mismatch_examples": mismatched[:5],
        "finish_reasons": finished,
        "tokens_generated": sum(o.tokens for o in outcomes),
        "duration_s": round(duration, 2),
        "requests_per_s": round(requests / duration, 2),
        "tokens_per_s": round(sum(o.tokens for o in outcomes) / duration, 1),
        "reference_s": round(reference_s, 2),
        "rss_mb": {"ready": round(rss_ready / mib, 1), "before": round(rss_before / mib, 1),
                   "peak": round(rss_peak / mib, 1), "after": round(rss_after / mib, 1)},  # fmt: skip
        "rss_growth_mb": round(growth_mb, 1),
        "rss_series_mb": [(n, round(rss / mib, 1)) for n, rss in rss_series],
        "max_rss_growth_mb": max_rss_growth_mb,
        "idle_gauges": idle_gauges,
        "server_exit_code": exit_code,
        "hardware": hardware(),
    }
    summary["ok"] = (
        not failed and not lost and not mismatched and summary["warmup_errors"] == 0
        and all(v == 0 for v in idle_gauges.values()) and growth_mb <= max_rss_growth_mb and exit_code == 0
    )  # fmt: skip
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--model", default=None, help="default: models/shapes-demo, else a make-tiny llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args()
    summary = run_soak(args.requests, args.concurrency, args.model, args.device, args.max_batch_size,
                       args.max_rss_growth_mb, args.seed)  # fmt: skip
    summary["command"] = " ".join(["python", "tests/app/soak.py", *sys.argv[1:]])
    text = json.dumps(summary, indent=2)
    print(text)  # noqa: T201 (a script: the summary is its output)
    if args.out is not None:
        args.out.write_text(text + "\n")
    sys.exit(0 if summary["ok"] else 1)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
