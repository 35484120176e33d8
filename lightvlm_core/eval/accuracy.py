"""`lightvlm eval`: accuracy on the shapes task against the fraction of image tokens kept.

Held-out questions (scene seeds disjoint from training, see demo/scenes.py) are answered by the
engine for `none`, every LightVLM preset, and FastV / random at the same final kept fractions,
plus the effect of decode-time KV budgets on `Describe the image.`. Exact match after
normalisation (lower case, optional final period).
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

from lightvlm_core.bench.common import hardware, progress
from lightvlm_core.demo.scenes import QTYPES, answer_matches, heldout_questions
from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.reduction.schedule import PYRAMIDS
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

BATCH = 32
MAX_NEW_TOKENS = 24
KV_BUDGETS = (16, 32, 64, 128)
HELDOUT_SEED = 777


def methods(presets: list[str] | None = None) -> dict[str, AccelerationConfig]:
    """none, the LightVLM presets (all, or `presets`), and FastV / random at each one's final fraction."""
    out = {"none": AccelerationConfig("none")}
    for preset, stages in PYRAMIDS.items():
        if presets and preset not in presets:
            continue
        keep = stages[-1][1]
        out[preset] = AccelerationConfig(preset)
        out[f"fastv@{keep:g}"] = AccelerationConfig("fastv", keep_ratio=keep)
        out[f"random@{keep:g}"] = AccelerationConfig("random", keep_ratio=keep)
    return out


def answer_all(engine: Engine, questions: list[tuple], accel: AccelerationConfig, quiet: bool, desc: str
               ) -> tuple[list[bool], list]:
    correct, usages = [], []
    batches = range(0, len(questions), BATCH)
    for start in progress(batches, len(batches), desc, quiet):
        chunk = questions[start:start + BATCH]
        requests = [GenerationRequest(q, [img], SamplingParams(max_new_tokens=MAX_NEW_TOKENS), accel)
                    for img, q, _, _ in chunk]
        for (_, _, gold, _), result in zip(chunk, engine.generate(requests)):
            correct.append(answer_matches(result.text, gold))
            usages.append(result.usage)
    return correct, usages


def _row(name: str, accel: AccelerationConfig, questions: list[tuple], correct: list[bool], usages: list) -> dict:
    by_type = defaultdict(list)
    for (_, _, _, qtype), ok in zip(questions, correct):
        by_type[qtype].append(ok)
    n_img = sum(u.image_tokens for u in usages)
    return {
        "preset": name,
        "method": "lightvlm" if accel.preset in PYRAMIDS else accel.preset,
        "kept_fraction": round(sum(u.image_tokens_kept for u in usages) / n_img, 4),
        "kept_fraction_layer_avg": round(sum(u.image_kept_fraction_layer_avg * u.image_tokens for u in usages)
                                         / n_img, 4),
        "kv_budget": accel.kv_budget,
        "accuracy": round(sum(correct) / len(correct), 4),
        "per_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items())},
        "questions": len(correct),
    }


def evaluate(engine: Engine, num_questions: int, presets: list[str] | None = None, quiet: bool = False) -> dict:
    questions = list(heldout_questions(num_questions, seed=HELDOUT_SEED))
    rows = []
    for name, accel in methods(presets).items():
        correct, usages = answer_all(engine, questions, accel, quiet, name)
        rows.append(_row(name, accel, questions, correct, usages))
    describe = [q for q in questions if q[3] == "describe"]
    for budget in KV_BUDGETS:
        accel = AccelerationConfig("none", kv_budget=budget)
        correct, usages = answer_all(engine, describe, accel, quiet, f"kv{budget}")
        rows.append(_row(f"none+kv{budget}", accel, describe, correct, usages))
    base = rows[0]["accuracy"]
    base_describe = rows[0]["per_type"].get("describe", 0)
    for row in rows:
        ref = base_describe if row["kv_budget"] else base
        row["relative_to_none"] = round(row["accuracy"] / ref, 4) if ref else None
    return {"model": engine.model_name, "hardware": hardware(), "heldout_seed": HELDOUT_SEED,
            "question_types": QTYPES, "results": rows}


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    rows = [r for r in result["results"] if not r["kv_budget"]]
    base = next(r for r in rows if r["preset"] == "none")
    ax.axhline(base["accuracy"], color="grey", linestyle="--", label="none (all image tokens)")
    for method, marker in (("lightvlm", "o"), ("fastv", "s"), ("random", "^")):
        pts = sorted((r["kept_fraction"], r["accuracy"]) for r in rows if r["method"] == method)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("image tokens kept after the last stage (fraction, log scale)")
    ax.set_ylabel("held-out exact-match accuracy")
    ax.set_title(f"shapes-demo, {base['questions']} questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


COLUMNS = ["preset", "kept_fraction", "kept_fraction_layer_avg", "kv_budget", "accuracy", "relative_to_none"]


def run_eval(model: str | None, presets: list[str] | None, num_questions: int, as_json: bool,
             plot_path: str | None = None, out: str | None = None) -> int:
    from lightvlm_core.bench.common import emit

    engine = load_engine(model, device="auto")
    result = evaluate(engine, num_questions, presets, quiet=as_json)
    result["profile"] = "shapes-demo"
    emit(result, as_json, out, COLUMNS)
    if not as_json:
        for row in result["results"]:
            print(f"  {row['preset']:>14}: " + json.dumps(row["per_type"]), file=sys.stdout)
    if plot_path:
        plot(result, plot_path)
    return 0
