"""Prefill time with and without one of packed_weights.py's changes, in one process.

    .venv/bin/python scripts/ab_packed_weights.py --model /tmp/llm-heavy --presets none aggressive \
        --batches 1 4 --rounds 8
    .venv/bin/python scripts/ab_packed_weights.py --switch eager-vision --model DIR --image-size 448

`--switch packed` (default): the prefill's linears multiply by the packed copies, or by the plain
weights (the copies taken away). `--switch eager-vision`: a tower that runs eagerly (Qwen's, ...)
computes on oneDNN with the packed weights, or on MKL as before (`CompiledPrefill.eager_vision`).
One compiled engine; each round times `Engine.add` (vision tower + LLM prefill + first token) of
`batch` requests both ways, the order alternating from round to round, so that a noisy machine
disturbs both alike; prints medians, and of the vision part (the runner's `vision_ms`).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image

from lightvlm_core import packed_weights
from lightvlm_core.engine import Engine
from lightvlm_core.runner import load_runner
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams
from lightvlm_core.warmup import warm_up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="models/shapes-demo")
    ap.add_argument("--switch", choices=["packed", "eager-vision"], default="packed")
    ap.add_argument("--presets", nargs="+", default=["none", "aggressive"])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=6)
    args = ap.parse_args()
    engine = Engine(load_runner(args.model, device="cpu", dtype="float32", compile=True))
    warm_up(engine.runner)
    prefill, copies = engine.runner.compiled_prefill, dict(packed_weights._PACKED)
    print(f"{len(copies)} weights packed, {engine.runner.info()['packed_weight_mb']} MB; eager tower on oneDNN: "
          f"{prefill._eager_vision_onednn}", flush=True)
    if not copies or (args.switch == "eager-vision" and not prefill._eager_vision_onednn):
        return 1
    pixels = (np.random.default_rng(0).random((args.image_size, args.image_size, 3)) * 255).astype("uint8")
    image = Image.fromarray(pixels)

    def switch(on: bool) -> None:
        if args.switch == "packed":
            packed_weights._PACKED.clear()
            packed_weights._PACKED.update(copies if on else {})
        else:
            prefill._eager_vision_onednn = on

    def prefill_ms(batch: int, preset: str, on: bool) -> tuple[float, float]:
        switch(on)
        prepared = [engine.prepare(GenerationRequest("Describe the image.", [image], SamplingParams(max_new_tokens=1),
                                                     AccelerationConfig(preset))) for _ in range(batch)]
        start = time.perf_counter()
        engine.add(prepared)
        elapsed = (time.perf_counter() - start) * 1e3
        vision = engine.runner.last_prefill_ms["vision_ms"]
        while engine.num_running:  # one token asked: nothing runs on; kept for safety
            engine.step()
        return elapsed, vision

    times: dict[tuple, list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for preset in args.presets:
            for batch in args.batches:
                for on in (True, False)[::-1 if r % 2 else 1]:
                    times.setdefault((preset, batch, on), []).append(prefill_ms(batch, preset, on))
    switch(True)
    for preset in args.presets:
        for batch in args.batches:
            (off, off_vision), (on, on_vision) = (
                (statistics.median(t for t, _ in times[(preset, batch, s)]),
                 statistics.median(v for _, v in times[(preset, batch, s)])) for s in (False, True))
            print(f"{preset} batch {batch}: without {off:.1f} ms (vision {off_vision:.1f}), with {on:.1f} ms "
                  f"(vision {on_vision:.1f}), x{off / on:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
