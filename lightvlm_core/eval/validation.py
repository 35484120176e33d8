"""Method choices are made here, on validation scenes, never on the test split (seed 777).

    python -m lightvlm_core.eval.validation N SEED CONFIG [CONFIG ...]

Each CONFIG is `method,keep` (a registry name) or `x,keep,field=value,...` (a LightVLM variant with
those dataclass fields, e.g. `x,0.03,select='topk'`). Scenes come from `heldout/{SEED}/i`
(disjoint from training and, for SEED != 777, from the test questions); `ONLY=describe` keeps one
question type. Prints accuracy, per-type accuracy and wall time per config.
"""

from __future__ import annotations

import ast
import os
import sys
import time
from collections import defaultdict

from lightvlm_core.demo.scenes import answer_matches, heldout_questions
from lightvlm_core.engine import load_engine
from lightvlm_core.reduction.lightvlm import LightVLM
from lightvlm_core.reduction.registry import register, unregister
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


def accel_for(config: str) -> AccelerationConfig:
    name, keep, *fields = config.split(",")
    if name != "x":
        return AccelerationConfig(name, keep_ratio=float(keep))
    kwargs = {k: ast.literal_eval(v) for k, v in (f.split("=") for f in fields)}
    unregister("variant")
    register("variant", lambda keep_ratio=0.1: LightVLM(keep_ratio=keep_ratio, **kwargs))
    return AccelerationConfig("variant", keep_ratio=float(keep))


def main(argv: list[str]) -> int:
    n, seed, configs = int(argv[0]), int(argv[1]), argv[2:]
    engine = load_engine(os.environ.get("LIGHTVLM_MODEL", "models/shapes-demo"), device="cpu")
    questions = list(heldout_questions(n, seed=seed))
    if os.environ.get("ONLY"):
        questions = [q for q in questions if q[3] in os.environ["ONLY"].split(",")]
    for config in configs:
        accel, ok, start = accel_for(config), defaultdict(list), time.time()
        for i in range(0, len(questions), 32):
            chunk = questions[i:i + 32]
            results = engine.generate([GenerationRequest(q, [img], SamplingParams(max_new_tokens=24), accel)
                                       for img, q, _, _ in chunk])
            for (_, _, gold, qtype), r in zip(chunk, results):
                ok[qtype].append(answer_matches(r.text, gold))
        flat = [x for v in ok.values() for x in v]
        per_type = {k: round(sum(v) / len(v), 3) for k, v in sorted(ok.items())}
        print(f"{config:50s} {sum(flat) / len(flat):.4f} {per_type} n={len(flat)} {time.time() - start:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
