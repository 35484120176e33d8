"""Where does an engine step's time go? Prefill and decode at several batch sizes, in-process.

    .venv/bin/python scripts/profile_engine.py --model models/shapes-demo --batches 1 4 8 \
        --out bench_results/profile-shapes-demo.md
    .venv/bin/python scripts/profile_engine.py --profile cpu-small --batches 1 4 8 \
        --out bench_results/profile-cpu-small.md

For each case it runs the steps under the torch profiler without stack tracing (op self times
and the wall time: the profiler adds ~1 us per op), then a few more with Python stacks to learn
where each op name is issued from, and attributes the ops' time twice:

- by kind: matmul (mm/addmm/bmm/linear), attention (SDPA, and ops under the attention code),
  sampling (ops under lightvlm_core/sampling.py or the engine's token choice), cache copies
  (cat/copy/index ops under lightvlm_core/kv/ or in the engine's cache bookkeeping), other ops
  (norms, rotary, elementwise, embedding); `python + framework` is the step's wall time minus all
  ops' self time (interpreter, module calls, dispatch, allocation between ops);
- by place: the innermost lightvlm_core (else transformers/torch.nn) frame that issued the op.

Percentages are of the step's wall time in the stack-free run. Uses the engine API
`Engine.prepare/add/step` (lightvlm_core/engine.py).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::linear",
          "aten::_addmm_activation"}
SDPA = re.compile(r"scaled_dot_product|flash_attention|_efficient_attention|aten::_softmax|aten::softmax")
COPY = re.compile(r"aten::(cat|copy_|index_copy|index_select|index_put|clone|stack|contiguous|narrow_copy|"
                  r"_to_copy|empty|empty_strided|resize_|zeros|fill_|masked_scatter|scatter|gather|slice_scatter)")
FRAME = re.compile(r"(?P<file>[^\s()]+\.py)\((?P<line>\d+)\): (?P<func>\S+)")


def requests(engine: Engine, batch: int, image, question: str, max_new: int, preset: str):
    def one() -> GenerationRequest:  # a request of its own per row: rows need distinct ids
        return GenerationRequest(question, [image], SamplingParams(max_new_tokens=max_new, ignore_eos=True),
                                 AccelerationConfig(preset))
    return [engine.prepare(one()) for _ in range(batch)]


def profiled(fn, stack: bool) -> tuple[list, float]:
    """ATen events of `fn()` and its wall time. Without stacks the profiler costs ~1 us per op, so
    the wall time is close to an unprofiled run; with stacks every Python call is traced (slow),
    which is only used to tell where ops come from."""
    with profile(activities=[ProfilerActivity.CPU], with_stack=stack, record_shapes=False) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    return [e for e in prof.events() if e.name.startswith("aten::")], wall


def drain(engine: Engine) -> None:
    """Finish every running row (the offline engine has no remove-all; the old one had)."""
    if hasattr(engine, "remove_all"):
        engine.remove_all()
    while engine.num_running:
        engine.step()


def steps(engine: Engine, n: int):
    """A function running `n` decode steps of the rows already running."""
    def run() -> None:
        for _ in range(n):
            engine.step()
    return run


def place_of(event) -> str:
    """The innermost project frame (else a transformers / torch.nn frame) above an op: the Python
    function events the profiler records with `with_stack=True` are the op's ancestors."""
    fallback = None
    node = event.cpu_parent
    while node is not None:
        m = FRAME.search(node.name)
        if m:
            path = m["file"]
            if "lightvlm_core/" in path:
                return f"{path[path.index('lightvlm_core/'):]}:{m['func']}"
            if fallback is None and ("transformers/" in path or "torch/nn/" in path):
                fallback = f"{path[path.rindex('/') + 1:]}:{m['func']}"
        node = node.cpu_parent
    return fallback or "(no Python frame)"


def kind_of(name: str, place: str) -> str:
    if "sampling.py" in place:
        return "sampling"
    if name in MATMUL:
        return "matmul"
    if SDPA.search(name) or "attention" in place or "_attend" in place:
        return "attention (non-matmul)"
    if "kv/" in place or (COPY.search(name) and ("engine.py" in place or "sequence" in place)):
        return "KV cache / batch bookkeeping"
    return "other ops (norm, rotary, activation, residual, embedding)"


def breakdown(plain: list, plain_wall: float, stacked: list, reps: int) -> tuple[dict, dict, dict, float]:
    """Per-step seconds by kind, by place and by op. Op times and the wall time come from the
    stack-free run; each op name's split across kinds and places comes from the stacked run.
    `python + framework` = wall - all ops' self time. Returns also top-level ops per step."""
    split: dict[str, dict[tuple[str, str], float]] = defaultdict(lambda: defaultdict(float))
    for e in stacked:
        place = place_of(e)
        split[e.name][(kind_of(e.name, place), place)] += e.self_cpu_time_total
    kinds: dict[str, float] = defaultdict(float)
    places: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for e in plain:
        ops[e.name] += e.self_cpu_time_total / 1e6 / reps
    for name, t in ops.items():
        parts = split.get(name) or {(kind_of(name, ""), "(not seen with stacks)"): 1.0}
        total = sum(parts.values())
        for (kind, place), share in parts.items():
            kinds[kind] += t * share / total
            places[place] += t * share / total
    wall = plain_wall / reps
    kinds["python + framework (between ops)"] = max(0.0, wall - sum(ops.values()))
    top_level = sum(1 for e in plain if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")) / reps
    return dict(kinds), dict(places), dict(ops), top_level


def table(kinds: dict, places: dict, ops: dict, top_level: float, wall_s: float, top: int = 8) -> list[str]:
    lines = [f"step wall time (mean over the profiled steps, no stack tracing): **{wall_s * 1e3:.2f} ms**; "
             f"{top_level:.0f} ATen calls from Python per step", "",
             "| where the time goes | ms / step | % of step |", "|---|---|---|"]
    for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {k} | {v * 1e3:.2f} | {100 * v / wall_s:.1f}% |")
    lines += ["", "| issued from (innermost project frame) | op ms / step | % of step |", "|---|---|---|"]
    for k, v in sorted(places.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| `{k}` | {v * 1e3:.2f} | {100 * v / wall_s:.1f}% |")
    lines += ["", "| ATen op (self time) | ms / step | % of step |", "|---|---|---|"]
    for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:top]:
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
    engine.add(requests(engine, 1, image, question, 1, args.preset))  # warm-up
    drain(engine)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = [f"# Engine step profile: {name}, preset `{args.preset}`", "",
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS="
              f"{os.environ.get('OMP_NUM_THREADS', '-')}, LD_PRELOAD={os.environ.get('LD_PRELOAD', '-') or '-'}, "
              f"git {commit or '?'}; command: `python scripts/profile_engine.py "
              f"{'--profile ' + args.profile if args.profile else '--model ' + args.model} --batches "
              f"{' '.join(map(str, args.batches))} --preset {args.preset}`", ""]
    for batch in args.batches:  # one prefill per row, then plain steps and a few stacked ones
        drain(engine)
        engine.add(requests(engine, batch, image, question, args.decode_steps + 8, args.preset))
        steps(engine, 2)()  # warm-up
        plain, wall = profiled(steps(engine, args.decode_steps), False)
        stacked, _ = profiled(steps(engine, 3), True)
        kinds, places, ops, top_level = breakdown(plain, wall, stacked, args.decode_steps)
        drain(engine)
        per_step = wall / args.decode_steps
        report += [f"## decode step, batch {batch}", "", *table(kinds, places, ops, top_level, per_step), ""]
        print("\n".join(report[-24:]), flush=True)
    for batch in args.batches:
        start = time.perf_counter()
        prepared = [requests(engine, batch, image, question, 1, args.preset) for _ in range(args.prefill_runs + 1)]
        prepare_ms = (time.perf_counter() - start) * 1e3 / batch / (args.prefill_runs + 1)

        def prefill(runs=prepared[:-1]) -> None:
            for p in runs:
                engine.add(p)
                drain(engine)

        plain, wall = profiled(prefill, False)
        # the split of each op name by kind and place, from one stacked batch-1 prefill
        stacked, _ = profiled(lambda p=prepared[-1][:1]: (engine.add(p), drain(engine)), True)
        kinds, places, ops, top_level = breakdown(plain, wall, stacked, args.prefill_runs)
        report += [f"## prefill (engine.add: vision + LLM prefill + first token), batch {batch}", "",
                   f"(before it, engine.prepare: chat template + tokenizer + image processor, "
                   f"{prepare_ms:.1f} ms per request, not included below)", "",
                   *table(kinds, places, ops, top_level, wall / args.prefill_runs), ""]
        print("\n".join(report[-24:]), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
