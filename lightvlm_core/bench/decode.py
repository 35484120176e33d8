"""`lightvlm bench decode`: long generation and batched decode throughput, with and without
KV compression and pyramid merging, all in one run.

Decode cost per step = the weights, read once per batch, + every row's KV cache. Compression
bounds the KV part, so it pays off where KV dominates: large batches and long outputs.

Every row also reports its memory-bandwidth bound: the bytes a step must read (the LLM weights it
multiplies by, once per batch, + the mean KV cache) over this machine's measured copy bandwidth,
and how far the measured step time is from it (`x_bound`); and the same over the bandwidth of a
read-only pass (`x_read_bound`), which is what a step does with its weights. Both bandwidths are
measured around every run (just before it and just after; the faster of the two), and each run is
held against its own: on the 2-vCPU VM of the README a two-thread copy measures 40-55 GB/s (read +
written bytes) most of the time and 75-90 for minutes at a time, so a bandwidth measured once, at
the end, compared steps run at one speed with a bound taken at the other. The header gives the
range of all samples.
"""

from __future__ import annotations

import time

import torch

from lightvlm_core.bench.common import hardware, median, progress, service_runner, sync
from lightvlm_core.bench.profiles import PROFILES, Profile, bench_image, build
from lightvlm_core.engine import Engine
from lightvlm_core.graphed_decode import GraphedDecode
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

PROMPT = "Describe this image in as much detail as you can."


def configs(profile: Profile) -> dict[str, AccelerationConfig]:
    return {
        "none": AccelerationConfig("none"),
        "kv": AccelerationConfig("none", kv_budget=profile.kv_budget),
        "aggressive": AccelerationConfig("aggressive"),
        "aggressive+kv": AccelerationConfig("aggressive", kv_budget=profile.kv_budget),
    }


def run(profile_name: str, quiet: bool = False) -> dict:
    profile = PROFILES[profile_name]
    runner = service_runner(build(profile))
    engine = Engine(runner)
    image = bench_image(profile)
    cases = [("long", 1, n) for n in profile.decode_lengths] + [
        ("throughput", b, profile.decode_tokens) for b in profile.decode_batches]
    work = [(case, name, accel) for case in cases for name, accel in configs(profile).items()] * profile.decode_repeats
    measured: dict[tuple, list[dict]] = {}
    _generate(engine, image, 1, 4, AccelerationConfig())  # warm-up
    samples = [_bandwidths(engine.device)]
    for (kind, batch, tokens), name, accel in progress(work, len(work), "decode", quiet):
        m = _generate(engine, image, batch, tokens, accel)
        samples.append(_bandwidths(engine.device))
        m["copy_bandwidth"], m["read_bandwidth"] = (max(a, b) for a, b in zip(samples[-2], samples[-1]))
        measured.setdefault((kind, batch, tokens, name), []).append(m)
    weights = step_weight_bytes(engine)
    copies, reads = ([round(sample[i] / 1e9, 2) for sample in samples] for i in (0, 1))
    return {"profile": profile.name, "hardware": hardware(), "kv_budget": profile.kv_budget,
            "compiled_decode": runner.compiled_decode is not None,
            "cuda_graphs": graph_counts(runner), "llm_weight_mb": round(weights / 2**20, 1),
            "copy_bandwidth_gb_s_range": [min(copies), max(copies)],
            "read_bandwidth_gb_s_range": [min(reads), max(reads)], "results": _rows(measured, weights)}


def graph_counts(runner) -> dict | None:
    """CUDA graphs captured and replayed by the decode step (None where it uses none)."""
    graphs = runner.compiled_decode
    return {"captures": graphs.captures, "replays": graphs.replays} if isinstance(graphs, GraphedDecode) else None


def step_weight_bytes(engine: Engine) -> int:
    """Bytes of weights one decode step reads: every LLM parameter and the LM head, each once (tied
    weights counted once), except the input embedding table, of which a step reads only B rows."""
    adapter = engine.adapter
    params = {p.data_ptr(): p for p in [*adapter.text_model.parameters(), *adapter.lm_head.parameters()]}
    embedding = adapter.embed_tokens.weight
    if all(p.data_ptr() != embedding.data_ptr() for p in adapter.lm_head.parameters()):
        params.pop(embedding.data_ptr(), None)
    return sum(p.numel() * p.element_size() for p in params.values())


def copy_bandwidth(device: torch.device, size_bytes: int = 256 * 2**20, rounds: int = 9) -> float:
    """Measured memory bandwidth, bytes per second: (read + written) bytes of a large copy, the
    fastest of `rounds`, with the engine's thread count. Large enough that no cache holds it. The
    fastest, not the median: a bound is what the machine can do (on a shared VM the median of a
    2-thread copy wandered between 7 and 15 GB/s from one call to the next; the best stayed at 15-16)."""
    src = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * size_bytes / _fastest_s(device, lambda: dst.copy_(src), rounds)


def read_bandwidth(device: torch.device, size_bytes: int = 256 * 2**20, rounds: int = 9) -> float:
    """Measured read bandwidth, bytes per second: a sum over `size_bytes`, the fastest of `rounds`
    (as `copy_bandwidth`)."""
    data = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    return size_bytes / _fastest_s(device, data.sum, rounds)


def _bandwidths(device: torch.device) -> tuple[float, float]:
    """(copy, read) bandwidth now, bytes per second: the fastest of 3 rounds each (~0.1 s in all)."""
    return copy_bandwidth(device, rounds=3), read_bandwidth(device, rounds=3)


def _fastest_s(device: torch.device, op, rounds: int) -> float:
    """The fastest of `rounds` timed calls of `op` on `device`, in seconds, after one untimed call."""
    times = []
    for _ in range(rounds + 1):
        sync(device)
        start = time.perf_counter()
        op()
        sync(device)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def _generate(engine: Engine, image, batch: int, tokens: int, accel: AccelerationConfig) -> dict:
    requests = [GenerationRequest(PROMPT, [image], SamplingParams(max_new_tokens=tokens, ignore_eos=True), accel)
                for _ in range(batch)]
    prepared = [engine.prepare(r) for r in requests]
    sync(engine.device)
    start = time.perf_counter()
    engine.add(prepared)
    sync(engine.device)
    decode_start = time.perf_counter()
    peak_kv = engine.kv_cache_bytes()
    kv_samples = []
    while engine.num_running:
        engine.step()
        kv_samples.append(engine.kv_cache_bytes())
        peak_kv = max(peak_kv, kv_samples[-1])
    sync(engine.device)
    end = time.perf_counter()
    decoded = batch * (tokens - 1)  # the first token comes from prefill
    return {"total_ms": (end - start) * 1e3, "decode_ms": (end - decode_start) * 1e3,
            "decode_tokens_per_s": decoded / (end - decode_start), "peak_kv_bytes": peak_kv,
            "mean_kv_bytes": sum(kv_samples) / max(len(kv_samples), 1)}


def _rows(measured: dict[tuple, list[dict]], weight_bytes: int) -> list[dict]:
    rows = []
    for (kind, batch, tokens, name), runs in measured.items():
        decode_ms, mean_kv = median(r["decode_ms"] for r in runs), median(r["mean_kv_bytes"] for r in runs)
        step_ms = decode_ms / (tokens - 1)
        # each run's bound over the bandwidths measured around it; the row: their medians
        bound_ms = median((weight_bytes + r["mean_kv_bytes"]) / r["copy_bandwidth"] * 1e3 for r in runs)
        read_bound_ms = median((weight_bytes + r["mean_kv_bytes"]) / r["read_bandwidth"] * 1e3 for r in runs)
        base = measured[(kind, batch, tokens, "none")]
        total, base_total = median(r["total_ms"] for r in runs), median(r["total_ms"] for r in base)
        tps, base_tps = median(r["decode_tokens_per_s"] for r in runs), median(r["decode_tokens_per_s"] for r in base)
        rows.append({
            "case": kind, "batch": batch, "new_tokens": tokens, "preset": name,
            "total_ms_median": total, "decode_ms_median": decode_ms,
            "decode_tokens_per_s": tps, "peak_kv_mb": round(max(r["peak_kv_bytes"] for r in runs) / 2**20, 2),
            "mean_kv_mb": round(mean_kv / 2**20, 2),
            # bytes read per decode step: the weights once per batch, every row's KV (mean over steps)
            "kv_to_weight_read_ratio": round(mean_kv / weight_bytes, 2),
            # long generation: end-to-end time ratio; throughput: decode tokens/s ratio
            "speedup_vs_none": round(base_total / total if kind == "long" else tps / base_tps, 2),
            "copy_bandwidth_gb_s": round(median(r["copy_bandwidth"] for r in runs) / 1e9, 2),
            "step_ms": round(step_ms, 3), "bound_ms": round(bound_ms, 3), "x_bound": round(step_ms / bound_ms, 2),
            "read_bound_ms": round(read_bound_ms, 3), "x_read_bound": round(step_ms / read_bound_ms, 2),
            "runs": len(runs),
        })
    return rows


COLUMNS = ["case", "batch", "new_tokens", "preset", "total_ms_median", "decode_tokens_per_s", "peak_kv_mb",
           "mean_kv_mb", "kv_to_weight_read_ratio", "speedup_vs_none", "copy_bandwidth_gb_s", "step_ms", "bound_ms",
           "x_bound", "x_read_bound"]
