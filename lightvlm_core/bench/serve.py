"""`lightvlm bench serve`: the service end to end over real HTTP, under load, per preset.

One run builds the profile's model once, wraps it in one `Engine`, serves it with the real app
(uvicorn on a free loopback port, in a background thread) and drives it with the load generator
of `loadgen.py`, whose HTTP client runs in a child process (as real clients would: in this
process it would take the GIL from the engine thread). Presets are chosen per request (the
`acceleration` field), so every preset runs on the same model, server and scheduler. Rows:

- `closed`: C concurrent clients (closed loop) for each C in the workload, per preset;
- `open`: Poisson arrivals at each rate, per preset (queueing shows up in TTFT);
- `compare`: what users would otherwise run on the same model, prompts and images: plain
  `transformers` `generate()` one request at a time and as one left-padded batch, next to
  the engine's own batched loop (`Engine.generate`'s) on the same batch with acceleration off
  and on (no scheduler, no HTTP); `matches_transformers` is the share of greedy outputs equal
  to plain `transformers`';
- `overhead`: the same closed-loop load through the scheduler in-process (submit and iterate the
  events, no HTTP) and over HTTP + SSE, in interleaved pairs; `overhead_pct` is the throughput
  lost to the HTTP layer and `overhead_cpu_pct` the CPU time it adds to this process (server and
  engine), each the median over the pairs. On a shared machine the CPU figure is the steadier.

`speedup_vs_none` is the output tokens/s ratio against preset `none` at the same load (for
`compare` rows: against `engine-none`; for `overhead` rows: against closed-loop `none` at that
concurrency). Every request streams exactly `max_new_tokens` tokens (`ignore_eos`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import io
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import httpx
import torch
from PIL import Image

from lightvlm_core.bench import loadgen
from lightvlm_core.bench.common import hardware, progress, sync
from lightvlm_core.bench.profiles import PROFILES, bench_image, build
from lightvlm_core.engine import Engine
from lightvlm_core.loading import LoadedModel
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

PROMPTS = (
    "Describe this image.",
    "What objects are in the picture, and what colours are they?",
    "Describe this image in detail, then list every object you can see.",
    "How many shapes are there?",
)


@dataclass(frozen=True)
class ServeWorkload:
    concurrencies: tuple[int, ...] = (1, 4, 8)
    requests_per_point: int = 8
    rates: tuple[float, ...] = (0.5,)  # open-loop arrivals per second
    max_new_tokens: int = 32
    presets: tuple[str, ...] = ("none", "light", "balanced", "aggressive")
    overhead_preset: str = "aggressive"  # fastest prefill: the per-token HTTP cost weighs most
    overhead_repeats: int = 4  # in-process / HTTP pairs, interleaved; medians reported
    compare: bool = True  # transformers / Engine.generate rows, on a batch of max(concurrencies)
    seed: int = 0


WORKLOADS: dict[str, ServeWorkload] = {
    "cpu-small": ServeWorkload(),
    "ci-tiny": ServeWorkload(concurrencies=(1, 2), requests_per_point=2, rates=(20.0,), max_new_tokens=4,
                             presets=("none", "aggressive"), overhead_repeats=1),
    "gpu-8b": ServeWorkload(concurrencies=(1, 8, 32), requests_per_point=64, rates=(2.0, 8.0),
                            max_new_tokens=256, overhead_repeats=3),
    "gpu-26b": ServeWorkload(concurrencies=(1, 8), requests_per_point=32, rates=(1.0,), max_new_tokens=256),
    "qwen2vl-7b": ServeWorkload(concurrencies=(1, 8, 32), requests_per_point=64, rates=(2.0, 8.0),
                                max_new_tokens=256),
}


def run(profile_name: str, quiet: bool = False, *, loaded: LoadedModel | None = None,
        workload: ServeWorkload | None = None, image: Image.Image | None = None) -> dict:
    """Run the serve bench. `loaded`, `workload` and `image` override the profile's (tests)."""
    workload = workload or WORKLOADS.get(profile_name, ServeWorkload())
    if loaded is None:
        profile = PROFILES[profile_name]
        loaded, image = build(profile), image or bench_image(profile)
    bench = _Bench(Engine(loaded), workload, image or Image.new("RGB", (64, 48), (120, 160, 200)))
    jobs = bench.jobs()
    rows: list[dict] = []
    if workload.compare:
        bench.warm_up()  # the first runs of a model in a process are slow; the service warms itself up
    with contextlib.ExitStack() as stack:
        for job in progress(jobs, len(jobs), "serve", quiet):
            if job.needs_server and bench.url is None:
                stack.enter_context(bench.serving())
            rows.append(job.fn())
    return {"profile": profile_name, "hardware": hardware(), "workload": _workload_dict(workload, bench),
            "results": _finish(rows)}


@dataclass
class _Job:
    needs_server: bool
    fn: Callable[[], dict]


class _Bench:
    def __init__(self, engine: Engine, workload: ServeWorkload, image: Image.Image) -> None:
        self.engine, self.w, self.image = engine, workload, image
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        self.image_b64 = base64.b64encode(buf.getvalue()).decode()
        self.url: str | None = None
        self.scheduler: Any = None

    def jobs(self) -> list[_Job]:
        w, jobs = self.w, []
        if w.compare:
            batch = max(w.concurrencies)
            jobs += [_Job(False, lambda: self.transformers(batch, 1)),
                     _Job(False, lambda: self.transformers(batch, batch))]
            jobs += [_Job(False, lambda p=p: self.engine_batch(batch, p)) for p in ("none", "aggressive")]
        for c in w.concurrencies:  # presets interleaved, so slow drifts hit every preset alike
            jobs += [_Job(True, lambda c=c, p=p: self.closed(c, p)) for p in w.presets]
        for rate in w.rates:
            jobs += [_Job(True, lambda r=rate, p=p: self.open(r, p)) for p in w.presets]
        for _ in range(w.overhead_repeats):
            jobs += [_Job(True, lambda t=t: self.overhead(t)) for t in ("in-process", "http")]
        return jobs

    # ---- requests ---------------------------------------------------------------------------

    def body(self, i: int, preset: str) -> dict[str, Any]:
        return {"prompt": PROMPTS[i % len(PROMPTS)], "image": self.image_b64, "ignore_eos": True,
                "max_new_tokens": self.w.max_new_tokens, "acceleration": {"preset": preset}}

    def request(self, i: int, preset: str) -> GenerationRequest:
        return GenerationRequest(PROMPTS[i % len(PROMPTS)], [self.image],
                                 SamplingParams(max_new_tokens=self.w.max_new_tokens, ignore_eos=True),
                                 AccelerationConfig(preset))

    # ---- the service --------------------------------------------------------------------------

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """The real app around our engine, on a loopback port; warmed up once per preset."""
        from app.main import create_app

        app = create_app(_settings(max(self.w.concurrencies), self.w.max_new_tokens), engine=self.engine)
        with _uvicorn_thread(app) as url:
            self.url, self.scheduler = url, app.state.service.scheduler
            try:
                for preset in self.w.presets:
                    self._http(preset, concurrency=1, num_requests=1)
                yield
            finally:
                self.url = self.scheduler = None

    def _http(self, preset: str, concurrency: int | None = None, rate: float | None = None,
              num_requests: int | None = None) -> loadgen.LoadResult:
        """The load over real HTTP + SSE, from a client process of its own (see loadgen.py)."""
        bodies = [self.body(i, preset) for i in range(len(PROMPTS))]
        return loadgen.run_http_load(self.url or "", bodies, num_requests or self.w.requests_per_point,
                                     concurrency=concurrency, rate=rate, seed=self.w.seed)

    def _in_process(self, preset: str, concurrency: int) -> loadgen.LoadResult:
        """The same closed loop through the scheduler in this process: no HTTP, no SSE."""

        async def drive() -> loadgen.LoadResult:
            send = loadgen.scheduler_target(self.scheduler, lambda i: self.request(i, preset))
            return await loadgen.closed_loop(send, self.w.requests_per_point, concurrency)

        return asyncio.run(drive())

    def closed(self, concurrency: int, preset: str) -> dict:
        return _row(self._http(preset, concurrency=concurrency), "closed", "http", preset, concurrency=concurrency)

    def open(self, rate: float, preset: str) -> dict:
        return _row(self._http(preset, rate=rate), "open", "http", preset, rate=rate)

    def overhead(self, transport: str) -> dict:
        preset, c = self.w.overhead_preset, max(self.w.concurrencies)
        cpu0 = time.process_time()
        result = self._http(preset, concurrency=c) if transport == "http" else self._in_process(preset, c)
        row = _row(result, "overhead", transport, preset, concurrency=c)
        row["cpu_s"] = round(time.process_time() - cpu0, 3)  # this process: server + engine (+ in-process client)
        row["runs_output_tokens_per_s"], row["runs_cpu_s"] = [row["output_tokens_per_s"]], [row["cpu_s"]]
        return row

    # ---- without the service --------------------------------------------------------------------

    def transformers(self, num_requests: int, batch: int) -> dict:
        """Plain `model.generate()`: greedy, same inputs, `batch` requests per call (left-padded)."""
        tokenizer = self.engine.loaded.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            with torch.inference_mode():
                result, token_ids = self._hf_generate(num_requests, batch)
        finally:
            tokenizer.padding_side = side
        if batch == 1:
            self._hf_tokens = token_ids
        name = "transformers-sequential" if batch == 1 else "transformers-batched"
        return _row(result, "compare", name, "none", concurrency=batch)

    def _hf_generate(self, num_requests: int, batch: int, max_new_tokens: int | None = None
                     ) -> tuple[loadgen.LoadResult, list[list[int]]]:
        loaded = self.engine.loaded
        model, processor, n = loaded.model, loaded.processor, max_new_tokens or self.w.max_new_tokens
        config = copy.deepcopy(model.generation_config)
        config.update(do_sample=False, max_new_tokens=n, min_new_tokens=None, eos_token_id=None,
                      pad_token_id=processor.tokenizer.pad_token_id)  # eos off: same as ignore_eos
        texts = [_chat_text(processor, PROMPTS[i % len(PROMPTS)]) for i in range(num_requests)]
        records, token_ids = [], []
        start = time.perf_counter()
        for lo in range(0, num_requests, batch):
            chunk = range(lo, min(lo + batch, num_requests))
            sent, clock = time.perf_counter(), _TokenClock()
            inputs = processor(images=[self.image] * len(chunk), text=[texts[i] for i in chunk], padding=True,
                               return_tensors="pt").to(loaded.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
            out = model.generate(**inputs, generation_config=config, streamer=clock)
            sync(loaded.device)
            end, new = time.perf_counter(), out[:, inputs["input_ids"].shape[1]:]
            error = None if new.shape[1] == n else f"generated {new.shape[1]} tokens, not {n}"
            for row, i in enumerate(chunk):
                records.append(loadgen.RequestRecord(i, sent, clock.times, end, "length", error))
                token_ids.append(new[row].tolist())
        return loadgen.LoadResult(records, time.perf_counter() - start), token_ids

    def warm_up(self) -> None:
        tokenizer = self.engine.loaded.processor.tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            with torch.inference_mode():
                self._hf_generate(1, 1, max_new_tokens=2)
        finally:
            tokenizer.padding_side = side
        self.engine.generate([replace(self.request(0, p), sampling=SamplingParams(max_new_tokens=2))
                              for p in ("none", "aggressive")])

    def engine_batch(self, batch: int, preset: str) -> dict:
        """The loop of `Engine.generate` on the whole batch, timestamped (no scheduler, no HTTP)."""
        engine, start = self.engine, time.perf_counter()
        prepared = [engine.prepare(self.request(i, preset)) for i in range(batch)]
        row_of = {p.request_id: i for i, p in enumerate(prepared)}
        records = [loadgen.RequestRecord(i, start) for i in range(batch)]
        token_ids: list[list[int]] = [[] for _ in range(batch)]
        outputs = engine.add(prepared)
        while True:
            sync(engine.device)
            now = time.perf_counter()
            for out in outputs:
                i = row_of[out.request_id]
                if out.token is not None:
                    records[i].token_times.append(now)
                    token_ids[i].append(out.token.token_id)
                if out.done is not None:
                    records[i].finish_reason, records[i].end = out.done.finish_reason, now
            if not engine.num_running:
                break
            outputs = engine.step()
        result = loadgen.LoadResult(records, time.perf_counter() - start)
        row = _row(result, "compare", f"engine-{preset}", preset, concurrency=batch)
        hf = getattr(self, "_hf_tokens", None)
        if preset == "none" and hf is not None:  # greedy parity with plain transformers
            row["matches_transformers"] = round(sum(a == b for a, b in zip(hf, token_ids)) / batch, 3)
        return row


class _TokenClock:
    """A `generate(streamer=...)` that timestamps each decoding step (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _chat_text(processor: Any, prompt: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ---- server plumbing ---------------------------------------------------------------------------


def _settings(max_batch_size: int, max_new_tokens: int) -> Any:
    from app.settings import Settings

    class BenchSettings(Settings):
        @classmethod
        def settings_customise_sources(cls, settings_cls: Any, init_settings: Any, **sources: Any) -> tuple:
            return (init_settings,)  # reproducible: ignore LIGHTVLM_* variables of this shell

    return BenchSettings(max_batch_size=max_batch_size, max_queue=1024, max_new_tokens=max(max_new_tokens, 1),
                         request_timeout_s=3600.0, log_level="warning")


@contextlib.contextmanager
def _uvicorn_thread(app: Any) -> Iterator[str]:
    import uvicorn

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                            lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="lightvlm-bench-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the benchmark server did not start")
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        if httpx.get(f"{url}/ready", timeout=30).status_code != 200:
            raise RuntimeError("the benchmark server is not ready")
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


# ---- rows ----------------------------------------------------------------------------------------


def _row(result: loadgen.LoadResult, mode: str, system: str, preset: str, concurrency: int | None = None,
         rate: float | None = None) -> dict:
    load = f"c={concurrency}" if rate is None else f"{rate:g}/s"
    return {"mode": mode, "system": system, "preset": preset, "load": load, "concurrency": concurrency,
            "rate": rate, **loadgen.summarize(result),
            "tokens_per_request": sorted({r.num_tokens for r in result.records})}


def _finish(rows: list[dict]) -> list[dict]:
    """Merge the repeated overhead runs, then add `speedup_vs_none` and `overhead_pct`."""
    rows = _merge_repeats(rows)
    base = {(r["mode"], r["load"]): r for r in rows if r["preset"] == "none" and r["system"] == "http"}
    engine_none = next((r for r in rows if r["system"] == "engine-none"), None)
    in_process = {r["load"]: r for r in rows if r["mode"] == "overhead" and r["system"] == "in-process"}
    for row in rows:
        if row["mode"] == "compare":
            ref = engine_none
        else:
            ref = base.get(("closed" if row["mode"] == "overhead" else row["mode"], row["load"]))
        row["speedup_vs_none"] = _ratio(row, ref)
        if row["mode"] == "overhead" and row["system"] == "http" and row["load"] in in_process:
            # per interleaved pair, then the median: slow drifts of a shared machine cancel out
            ip = in_process[row["load"]]
            row["overhead_pct"] = _median_pct_change(ip["runs_output_tokens_per_s"], row["runs_output_tokens_per_s"],
                                                     sign=-1)  # throughput lost
            row["overhead_cpu_pct"] = _median_pct_change(ip["runs_cpu_s"], row["runs_cpu_s"])  # CPU added
    return rows


def _merge_repeats(rows: list[dict]) -> list[dict]:
    """One row per repeated (mode, system, load): medians, plus the per-run values of the key numbers."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["mode"], row["system"], row["preset"], row["load"]), []).append(row)
    merged = []
    for runs in groups.values():
        if len(runs) == 1:
            merged.append(runs[0])
            continue
        row = dict(runs[0], runs=len(runs), errors=sum(r["errors"] for r in runs),
                   **{k: round(statistics.median(r[k] for r in runs), 3) for k in _MEDIANS if k in runs[0]})
        for k in ("output_tokens_per_s", "cpu_s"):
            if k in runs[0]:
                row[f"runs_{k}"] = [r[k] for r in runs]
        merged.append(row)
    return merged


def _median_pct_change(base: list[float], other: list[float], sign: int = 1) -> float | None:
    """Median over the pairs (base[i], other[i]) of sign * 100 * (other - base) / base."""
    changes = [sign * 100 * (o - b) / b for b, o in zip(base, other) if b]
    return round(statistics.median(changes), 2) if changes else None


_MEDIANS = ("output_tokens_per_s", "requests_per_s", "wall_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
            "itl_ms_p99", "e2e_ms_p50", "e2e_ms_p99", "cpu_s")


def _ratio(row: dict, ref: dict | None) -> float | None:
    if ref is None or not ref["output_tokens_per_s"]:
        return None
    return round(row["output_tokens_per_s"] / ref["output_tokens_per_s"], 2)


def _workload_dict(w: ServeWorkload, bench: _Bench) -> dict:
    return dict(asdict(w), prompt_tokens=bench.engine.prepare(bench.request(0, "none")).num_prompt_tokens,
                image_size=list(bench.image.size))


COLUMNS = ["mode", "system", "preset", "load", "output_tokens_per_s", "requests_per_s", "ttft_ms_p50",
           "ttft_ms_p99", "itl_ms_p50", "e2e_ms_p50", "e2e_ms_p99", "speedup_vs_none", "overhead_pct", "errors"]


def plot(result: dict, path: str) -> None:
    """Closed-loop output tokens/s vs concurrency, one line per preset; open-loop TTFT beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    presets = list(dict.fromkeys(r["preset"] for r in rows if r["mode"] == "closed"))
    for preset in presets:
        pts = sorted((r["concurrency"], r["output_tokens_per_s"]) for r in rows
                     if r["mode"] == "closed" and r["preset"] == preset)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=preset)
    for r in rows:
        if r["mode"] == "compare" and r["system"].startswith("transformers"):
            ax.axhline(r["output_tokens_per_s"], ls="--", lw=1, color="grey" if "seq" in r["system"] else "black",
                       label=f"{r['system']} (batch {r['concurrency']})")
    ax.set_xlabel("concurrent clients (closed loop)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput over HTTP+SSE")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    opens = [r for r in rows if r["mode"] == "open"]
    loads = list(dict.fromkeys(r["load"] for r in opens))
    width = 0.8 / max(len(presets), 1)
    for k, preset in enumerate(presets):
        vals = [next((r["ttft_ms_p50"] for r in opens if r["load"] == ld and r["preset"] == preset), 0)
                for ld in loads]
        ax2.bar([i + k * width for i in range(len(loads))], vals, width, label=preset)
    ax2.set_xticks([i + width * (len(presets) - 1) / 2 for i in range(len(loads))], [f"λ={ld}" for ld in loads])
    ax2.set_ylabel("TTFT p50 (ms)")
    ax2.set_title("Open loop (Poisson arrivals)")
    ax2.legend(fontsize=8)
    fig.suptitle(f"lightvlm bench serve — {result['profile']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
