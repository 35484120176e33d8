"""Where does an engine step's time go? Prefill and decode at several batch sizes, in-process.

    .venv/bin/python scripts/profile_engine.py --model models/shapes-demo --batches 1 4 8 \
        --out bench_results/profile-shapes-demo.md
    .venv/bin/python scripts/profile_engine.py --profile cpu-small --batches 1 4 8 \
        --out bench_results/profile-cpu-small.md

For each case it times the step without any profiler (median wall time), then runs it under the
torch profiler with Python stacks and attributes every ATen op's self time twice:

- by kind: matmul (mm/addmm/bmm/linear), attention (SDPA, and ops under the attention code),
  sampling (ops under lightvlm_core/sampling.py or the engine's token choice), cache copies
  (cat/copy/index ops under lightvlm_core/kv/ or in the engine's cache bookkeeping), other ops
  (norms, rotary, elementwise, embedding); `python + framework` is the step's wall time minus all
  ops' self time (interpreter, module calls, dispatch, allocation between ops);
- by place: the innermost lightvlm_core (else transformers/torch.nn) frame that issued the op.

Percentages are of the unprofiled median step time (the profiler's own overhead inflates the
profiled run; op self times are measured inside the ops and barely move). Uses the engine API
`Engine.prepare/add/step/remove_all` (lightvlm_core/engine.py).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear", "aten::_addmm_activation"}
SDPA = re.compile(r"scaled_dot_product|flash_attention|_efficient_attention|aten::_softmax|aten::softmax")
COPY = re.compile(r"aten::(cat|copy_|index_copy|index_select|index_put|clone|stack|contiguous|narrow_copy|"
                  r"_to_copy|empty|empty_strided|resize_|zeros|fill_|masked_scatter|scatter|gather|slice_scatter)")
FRAME = re.compile(r"(?P<file>[^\s()]+\.py)\((?P<line>\d+)\): (?P<func>\S+)")


def requests(engine: Engine, batch: int, image, question: str, max_new: int, preset: str):
    req = GenerationRequest(question, [image], SamplingParams(max_new_tokens=max_new, ignore_eos=True),
                            AccelerationConfig(preset))
    return [engine.prepare(req) for _ in range(batch)]


def time_prefill(engine: Engine, batch: int, image, question: str, preset: str, runs: int) -> float:
    walls = []
    for _ in range(runs):
        prepared = requests(engine, batch, image, question, 2, preset)
        start = time.perf_counter()
        engine.add(prepared)
        walls.append(time.perf_counter() - start)
        engine.remove_all()
    return statistics.median(walls)


def time_decode(engine: Engine, batch: int, image, question: str, preset: str, steps: int) -> float:
    engine.add(requests(engine, batch, image, question, steps + 8, preset))
    for _ in range(3):
        engine.step()
    walls = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        walls.append(time.perf_counter() - start)
    engine.remove_all()
    return statistics.median(walls)


def profiled(fn) -> list:
    with profile(activities=[ProfilerActivity.CPU], with_stack=True, record_shapes=False) as prof:
        fn()
    return [e for e in prof.events() if e.name.startswith("aten::")]


def place_of(stack: list[str]) -> str:
    """The innermost project frame (else a transformers / torch.nn module frame) of an op's stack."""
    fallback = None
    for frame in stack:
        m = FRAME.search(frame)
        if not m:
            continue
        path = m["file"]
        if "lightvlm_core/" in path:
            return f"{path[path.index('lightvlm_core/'):]}:{m['func']}"
        if fallback is None and ("transformers/" in path or "torch/nn/" in path):
            fallback = f"{path[path.rindex('/') + 1:]}:{m['func']}"
    return fallback or "(no Python frame)"


def kind_of(name: str, place: str) -> str:
    if "sampling.py" in place or place.endswith((":_choose", ":_sample", ":sample")):
        return "sampling"
    if name in MATMUL:
        return "matmul"
    if SDPA.search(name) or "attention" in place or "_attend" in place:
        return "attention (non-matmul)"
    if COPY.search(name) and ("kv/" in place or "cache" in place or "engine.py" in place or "sequence" in place):
        return "cache / batch copies"
    return "other ops (norm, rotary, elementwise, embedding)"


def breakdown(events: list, reps: int, wall_s: float) -> tuple[dict, dict]:
    """Per-step self seconds by kind and by place; `python + framework` = wall - all ops."""
    kinds: dict[str, float] = defaultdict(float)
    places: dict[str, float] = defaultdict(float)
    for e in events:
        self_s = e.self_cpu_time_total / 1e6 / reps
        place = place_of(e.stack or [])
        kinds[kind_of(e.name, place)] += self_s
        places[place] += self_s
    kinds["python + framework (between ops)"] = max(0.0, wall_s - sum(kinds.values()))
    return dict(kinds), dict(places)


def table(kinds: dict, places: dict, wall_s: float, top: int = 8) -> list[str]:
    lines = [f"step wall time (median, no profiler): **{wall_s * 1e3:.2f} ms**", "",
             "| where the time goes | ms / step | % of step |", "|---|---|---|"]
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v * 1e3:.2f} | {100 * v / wall_s:.1f}% |")
    lines += ["", "| issued from (innermost project frame) | op ms / step | % of step |", "|---|---|---|"]
    for k, v in sorted(places.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{k}` | {v * 1e3:.2f} | {100 * v / wall_s:.1f}% |")
    return lines


def build_engine(args) -> tuple[Engine, object, str, str]:
    if args.profile:
        from lightvlm_core.bench.profiles import PROFILES, bench_image, build

        prof = PROFILES[args.profile]
        return Engine(build(prof)), bench_image(prof), "Describe this image.", args.profile
    from lightvlm_core.demo.scenes import heldout_scene, sample_question

    rng, image, objs = heldout_scene(777, 0, size=224)
    question = sample_question(rng, objs, "color")[0]
    return load_engine(args.model, device="cpu", dtype="float32"), image, question, Path(args.model).name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/shapes-demo")
    ap.add_argument("--profile", default=None, help="a bench profile (random weights) instead of --model")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--preset", default="none")
    ap.add_argument("--decode-steps", type=int, default=20)
    ap.add_argument("--prefill-runs", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the Markdown report here")
    args = ap.parse_args()
    engine, image, question, name = build_engine(args)
    time_prefill(engine, 1, image, question, args.preset, 1)  # warm-up
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = [f"# Engine step profile: {name}, preset `{args.preset}`", "",
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', '-')}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '-') or '-'}, "
              f"git {commit or '?'}; command: `python scripts/profile_engine.py "
              f"{'--profile ' + args.profile if args.profile else '--model ' + args.model} --batches "
              f"{' '.join(map(str, args.batches))} --preset {args.preset}`", ""]
    for batch in args.batches:
        wall = time_decode(engine, batch, image, question, args.preset, args.decode_steps)
        engine.add(requests(engine, batch, image, question, 40, args.preset))
        for _ in range(3):
            engine.step()
        reps = 5
        events = profiled(lambda: [engine.step() for _ in range(reps)])
        engine.remove_all()
        report += [f"## decode step, batch {batch}", "", *table(*breakdown(events, reps, wall), wall), ""]
        print("\n".join(report[-20:]), flush=True)
    for batch in args.batches:
        wall = time_prefill(engine, batch, image, question, args.preset, args.prefill_runs)
        start = time.perf_counter()
        prepared = requests(engine, batch, image, question, 2, args.preset)
        prepare_ms = (time.perf_counter() - start) * 1e3 / batch
        events = profiled(lambda p=prepared: engine.add(p))
        engine.remove_all()
        report += [f"## prefill (engine.add: vision + LLM prefill + first token), batch {batch}", "",
                   f"(before it, engine.prepare: chat template + tokenizer + image processor, "
                   f"{prepare_ms:.1f} ms per request, not included below)", "",
                   *table(*breakdown(events, 1, wall), wall), ""]
        print("\n".join(report[-20:]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
