"""Prefill time with the weights packed for oneDNN (packed_weights.py) against plain, in one process.

    .venv/bin/python scripts/ab_packed_weights.py --model /tmp/llm-heavy --presets none aggressive \
        --batches 1 4 --rounds 8

One compiled engine; each round times `Engine.add` (vision tower + LLM prefill + first token) of
`batch` requests with the packed copies registered and with them taken away, the order alternating
from round to round, so that a noisy machine disturbs both alike; prints medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_engine import drain, requests  # noqa: E402

from lightvlm_core import packed_weights  # noqa: E402
from lightvlm_core.demo.scenes import heldout_scene, sample_question  # noqa: E402
from lightvlm_core.engine import Engine  # noqa: E402
from lightvlm_core.runner import load_runner  # noqa: E402
from lightvlm_core.warmup import warm_up  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/shapes-demo")
    ap.add_argument("--presets", nargs="+", default=["none", "aggressive"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    engine = Engine(load_runner(args.model, device="cpu", dtype="float32", compile=True))
    warm_up(engine.runner)
    copies = dict(packed_weights._PACKED)
    print(f"{len(copies)} weights packed, {engine.runner.info()['packed_weight_mb']} MB", flush=True)
    if not copies:
        return 1
    rng, image, objs = heldout_scene(777, 0, size=224)
    question = sample_question(rng, objs, "color")[0]

    def prefill_s(batch: int, preset: str, packed: bool) -> float:
        packed_weights._PACKED.clear()
        if packed:
            packed_weights._PACKED.update(copies)
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
                for packed in (True, False)[::-1 if r % 2 else 1]:
                    times.setdefault((preset, batch, packed), []).append(prefill_s(batch, preset, packed))
    packed_weights._PACKED.update(copies)
    for preset in args.presets:
        for batch in args.batches:
            plain, packed = (statistics.median(times[(preset, batch, p)]) for p in (False, True))
            print(f"{preset} batch {batch}: plain {plain * 1e3:.1f} ms, packed {packed * 1e3:.1f} ms, "
                  f"x{plain / packed:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
