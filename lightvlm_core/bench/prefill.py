"""`lightvlm bench prefill`: prefill time per preset and baseline, next to `none` in one run.

Runs are interleaved (none, light, ..., none, light, ...) so slow drifts hit every preset alike;
the median over runs is reported with the vision encoder's share and the speedup that the FLOP
model of METHOD.md §3 predicts from the layer-averaged kept fraction. On CPU the prefill runs
compiled as the service runs it (LIGHTVLM_COMPILE, default on; compiled_prefill.py), warmed up first.
"""

from __future__ import annotations

import gc
import time

import torch

from lightvlm_core.bench.common import hardware, median, progress, service_runner, sync
from lightvlm_core.bench.profiles import PROFILES, bench_image, build, describe
from lightvlm_core.engine import Engine
from lightvlm_core.reduction.registry import PRESET_STAGES as PYRAMIDS
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

PROMPT = "Describe this image in detail, then list every object you can see."


def configs() -> dict[str, AccelerationConfig]:
    final = PYRAMIDS["aggressive"][-1][1]  # baselines get the aggressive preset's final budget
    return {
        "none": AccelerationConfig("none"),
        "light": AccelerationConfig("light"),
        "balanced": AccelerationConfig("balanced"),
        "aggressive": AccelerationConfig("aggressive"),
        "fastv": AccelerationConfig("fastv", keep_ratio=final),
        "random": AccelerationConfig("random", keep_ratio=final),
    }


# The paper's claim that InternVL2.5-26B with LightVLM is faster than plain InternVL2.5-8B:
# profile name -> (bigger model run with every preset, smaller model whose `none` is the bar).
PAIRS = {"gpu-26b-vs-8b": ("gpu-26b", "gpu-8b")}


def run(profile_name: str, quiet: bool = False) -> dict:
    if profile_name in PAIRS:
        return run_pair(profile_name, quiet)
    profile = PROFILES[profile_name]
    runner = service_runner(build(profile))
    engine = Engine(runner)
    image = bench_image(profile)
    cases = configs()
    prepared = {name: engine.prepare(GenerationRequest(PROMPT, [image], SamplingParams(max_new_tokens=1), accel))
                for name, accel in cases.items()}
    times: dict[str, list[dict]] = {name: [] for name in cases}
    usage = {}
    _prefill(engine, prepared["none"])  # warm-up
    total = profile.prefill_runs * len(cases)
    order = [name for _ in range(profile.prefill_runs) for name in cases]
    for name in progress(order, total, "prefill", quiet):
        ms, usage[name] = _prefill(engine, prepared[name])
        times[name].append(dict(engine.last_prefill_ms, total_ms=ms))
    p = prepared["none"]
    shape = describe(engine.loaded, p.num_image_tokens, p.num_prompt_tokens - p.num_image_tokens,
                     _vision_tokens(engine, p))
    return {"profile": profile.name, "hardware": hardware(), "shape": shape,
            "compiled_prefill": runner.compiled_prefill is not None,
            "results": _rows(times, usage, p.num_image_tokens, p.num_prompt_tokens)}


def run_pair(pair_name: str, quiet: bool = False) -> dict:
    """Both models in turn (one in memory at a time); speedups are against the smaller one's `none`."""
    big, small = PAIRS[pair_name]
    small_result = run(small, quiet)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    big_result = run(big, quiet)
    bar = next(r for r in small_result["results"] if r["preset"] == "none")
    rows = [dict(bar, model=small)]
    for row in big_result["results"]:
        rows.append(dict(row, model=big, speedup_vs_none=round(bar["prefill_ms_median"] / row["prefill_ms_median"], 2),
                         speedup_vs_own_none=row["speedup_vs_none"]))
    return {"profile": pair_name, "hardware": big_result["hardware"], "baseline": f"{small} none",
            "shape": {small: small_result["shape"], big: big_result["shape"]}, "results": rows}


def _prefill(engine: Engine, prepared) -> tuple[float, object]:
    sync(engine.device)
    start = time.perf_counter()
    outputs = engine.add([prepared])
    sync(engine.device)
    ms = (time.perf_counter() - start) * 1e3
    return ms, outputs[0].done.usage  # max_new_tokens=1: the first token finishes the request


def _vision_tokens(engine: Engine, prepared) -> int:
    """Tokens the vision tower processes for this prompt (for the FLOP split)."""
    pv = prepared.prompt.vision.get("pixel_values")
    if pv is None:
        return 0
    if pv.dim() == 2:  # Qwen: one row per patch
        return pv.shape[0]
    cfg = engine.loaded.model.config.vision_config  # InternVL / LLaVA: (tiles, C, H, W)
    side = _first(cfg.image_size) // _first(cfg.patch_size)
    return pv.shape[0] * side * side


def _first(x) -> int:
    return x[0] if isinstance(x, (list, tuple)) else x


def _rows(times: dict[str, list[dict]], usage: dict, num_image: int, num_prompt: int) -> list[dict]:
    base = median(t["total_ms"] for t in times["none"])
    base_vision = median(t["vision_ms"] for t in times["none"])
    vision_share = base_vision / base
    text_frac = (num_prompt - num_image) / num_prompt
    rows = []
    for name, runs in times.items():
        total = median(t["total_ms"] for t in runs)
        u = usage[name]
        avg = u.image_kept_fraction_layer_avg
        llm_work = text_frac + (1 - text_frac) * avg
        rows.append({
            "preset": name,
            "prefill_ms_median": total,
            "vision_ms_median": median(t["vision_ms"] for t in runs),
            "llm_ms_median": median(t["llm_ms"] for t in runs),
            "vision_share": round(median(t["vision_ms"] for t in runs) / total, 3),
            "speedup_vs_none": round(base / total, 2),
            "expected_speedup": round(1 / (vision_share + (1 - vision_share) * llm_work), 2),
            "image_tokens": u.image_tokens,
            "image_tokens_kept": u.image_tokens_kept,
            "kept_fraction_final": round(u.image_tokens_kept / max(u.image_tokens, 1), 4),
            "kept_fraction_layer_avg": round(avg, 4),
            "runs": len(runs),
        })
    return rows


COLUMNS = ["model", "preset", "prefill_ms_median", "vision_ms_median", "llm_ms_median", "speedup_vs_none",
           "expected_speedup", "image_tokens_kept", "kept_fraction_final", "kept_fraction_layer_avg"]
