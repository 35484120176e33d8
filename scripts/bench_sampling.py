"""Time of one sampling call (lightvlm_core.sampling.sample) per batch size, vocabulary size and
sampling setting, for this tree's sampler and, with --baseline FILE, another version of the module
side by side (e.g. the one before batched sampling):

    git show d9f44db:lightvlm_core/sampling.py > /tmp/sampling_d9f44db.py
    OMP_NUM_THREADS=1 python scripts/bench_sampling.py --baseline /tmp/sampling_d9f44db.py

Logits are random with a spread like a real LM's (N(0, 4^2)); each row has its own seeded generator.
Medians of --rounds calls after a warm-up. Output: one JSON object per line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time

import torch

from lightvlm_core import sampling
from lightvlm_core.types import SamplingParams

SETTINGS = {"temperature 0.8": {"temperature": 0.8}, "top_p 0.9": {"temperature": 0.8, "top_p": 0.9},
            "top_k 50": {"temperature": 0.8, "top_k": 50}}


def load(path: str):
    spec = importlib.util.spec_from_file_location("baseline_sampling", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def time_us(module, batch: int, vocab: int, setting: dict, rounds: int) -> float:
    params = [SamplingParams(seed=i, **setting) for i in range(batch)]
    generators = [module.make_generator(p, torch.device("cpu")) for p in params]
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0)) * 4
    times = []
    for _ in range(rounds + 3):
        start = time.perf_counter()
        module.sample(logits, params, generators)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times[3:])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default=None, help="another sampling.py to time beside this tree's")
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--vocab", type=int, nargs="+", default=[42, 151936])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    args = p.parse_args()
    baseline = load(args.baseline) if args.baseline else None
    for vocab in args.vocab:
        for batch in args.batch:
            for name, setting in SETTINGS.items():
                row = {"vocab": vocab, "batch": batch, "setting": name, "threads": torch.get_num_threads(),
                       "us": round(time_us(sampling, batch, vocab, setting, args.rounds))}
                if baseline is not None:
                    row["baseline_us"] = round(time_us(baseline, batch, vocab, setting, args.rounds))
                    row["speedup"] = round(row["baseline_us"] / row["us"], 2)
                print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
