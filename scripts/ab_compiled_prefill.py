"""Prefill time, eager against compiled (LIGHTVLM_COMPILE), two engines in one process.

    .venv/bin/python scripts/ab_compiled_prefill.py --model models/shapes-demo --presets none aggressive \
        --batches 1 4 --rounds 8

Times `Engine.add` (vision tower + LLM prefill + first token) of `batch` requests, the two engines
alternating within each round (which one goes first alternates too), so that a noisy machine
disturbs both alike; prints medians. Both engines are warmed up first (the compiled one compiles).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_engine import drain, requests  # noqa: E402

from lightvlm_core.warmup import warm_up  # noqa: E402
from lightvlm_core.demo.scenes import heldout_scene, sample_question  # noqa: E402
from lightvlm_core.engine import Engine  # noqa: E402
from lightvlm_core.runner import load_runner  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/shapes-demo")
    ap.add_argument("--presets", nargs="+", default=["none", "aggressive"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    engines = {"eager": Engine(load_runner(args.model, device="cpu", dtype="float32")),
               "compiled": Engine(load_runner(args.model, device="cpu", dtype="float32", compile=True))}
    for name, engine in engines.items():
        start = time.perf_counter()
        warm_up(engine.runner)
        print(f"{name} warm-up {time.perf_counter() - start:.1f} s", flush=True)
    rng, image, objs = heldout_scene(777, 0, size=224)
    question = sample_question(rng, objs, "color")[0]

    def prefill_s(engine: Engine, batch: int, preset: str) -> float:
        prepared = requests(engine, batch, image, question, 1, preset)
        start = time.perf_counter()
        engine.add(prepared)
        elapsed = time.perf_counter() - start
        drain(engine)
        return elapsed

    times: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for preset in args.presets:
            for batch in args.batches:
                order = list(engines.items())[::-1 if r % 2 else 1]
                for name, engine in order:
                    times.setdefault((preset, batch, name), []).append(prefill_s(engine, batch, preset))
    for preset in args.presets:
        for batch in args.batches:
            eager, compiled = (statistics.median(times[(preset, batch, n)]) for n in ("eager", "compiled"))
            print(f"{preset} batch {batch}: eager {eager * 1e3:.1f} ms, compiled {compiled * 1e3:.1f} ms, "
                  f"x{eager / compiled:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
