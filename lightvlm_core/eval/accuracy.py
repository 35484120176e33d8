"""`lightvlm eval`: accuracy on the shapes task against the fraction of image tokens kept.

Held-out questions (scene seeds disjoint from training, see demo/scenes.py) are answered by the
engine for `none` and every reduction method of the registry at 35%, 10%, 5% and 3% of the image
tokens (LightVLM rows at 35/10/3% are the `light`/`balanced`/`aggressive` presets), each row with
its final and layer-averaged kept fraction, the measured prefill time and the binomial noise.
Then every KV policy at budgets 16-128 on two decode tasks (kv_table.py). Exact match after
normalisation (lower case, optional final period). Tuning happens on other seeds (VALIDATION_SEED).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict

from lightvlm_core.bench.common import hardware, progress
from lightvlm_core.demo.scenes import QTYPES, answer_matches, heldout_questions
from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.reduction.registry import PRESET_STAGES, method_names
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

BATCH = 32
MAX_NEW_TOKENS = 24
KEEP_RATIOS = (0.35, 0.1, 0.05, 0.03)
HELDOUT_SEED = 777  # the test split: never tuned on
VALIDATION_SEED = 4242  # the split method choices were made on
TIMING_QUESTIONS = 8  # prefill timed one request at a time on the first questions


def methods(presets: list[str] | None = None, keeps: tuple[float, ...] = KEEP_RATIOS, with_none: bool = True
            ) -> dict[str, AccelerationConfig]:
    """`none`, then every method (or those in `presets`) at every keep ratio; LightVLM rows at a
    preset's final ratio are that preset."""
    by_final = {stages[-1][1]: name for name, stages in PRESET_STAGES.items()}
    out = {"none": AccelerationConfig("none")} if with_none else {}
    for keep in sorted(keeps):  # the smallest fractions first: they separate the methods most
        for method in method_names():
            if method == "lightvlm" and keep in by_final:
                name, accel = by_final[keep], AccelerationConfig(by_final[keep])
            else:
                name, accel = f"{method}@{keep:g}", AccelerationConfig(method, keep_ratio=keep)
            if presets and not ({name, method} & set(presets) or (method == "lightvlm" and name in presets)):
                continue
            out[name] = accel
    return out


def answer_all(engine: Engine, questions: list[tuple], accel: AccelerationConfig, quiet: bool, desc: str,
               max_new_tokens: int = MAX_NEW_TOKENS) -> tuple[list[bool], list]:
    correct, usages = [], []
    batches = range(0, len(questions), BATCH)
    for start in progress(batches, len(batches), desc, quiet):
        chunk = questions[start:start + BATCH]
        requests = [GenerationRequest(q, [img], SamplingParams(max_new_tokens=max_new_tokens), accel)
                    for img, q, _, _ in chunk]
        for (_, _, gold, _), result in zip(chunk, engine.generate(requests)):
            correct.append(answer_matches(result.text, gold))
            usages.append(result.usage)
    return correct, usages


def prefill_ms(engine: Engine, questions: list[tuple], accel: AccelerationConfig,
               num: int = TIMING_QUESTIONS) -> float:
    """Median wall time of a batch-1 prefill (vision tower + LLM, first token) over `num` questions."""
    times = []
    for img, q, _, _ in questions[:num]:
        start = time.perf_counter()
        engine.generate([GenerationRequest(q, [img], SamplingParams(max_new_tokens=1), accel)])
        times.append((time.perf_counter() - start) * 1e3)
    return round(sorted(times)[len(times) // 2], 2)


def binomial_ci(p: float, n: int) -> float:
    """Half-width of the 95% normal-approximation interval of an accuracy p over n questions."""
    return 1.96 * math.sqrt(max(p * (1 - p), 1 / n) / n) if n else 0.0


def row(name: str, accel: AccelerationConfig, questions: list[tuple], correct: list[bool], usages: list) -> dict:
    by_type = defaultdict(list)
    for (_, _, _, qtype), ok in zip(questions, correct):
        by_type[qtype].append(ok)
    n_img = sum(u.image_tokens for u in usages)
    accuracy = sum(correct) / len(correct)
    return {
        "preset": name,
        "method": "lightvlm" if accel.preset in PRESET_STAGES else accel.preset,
        "keep_ratio": accel.keep_ratio if accel.keep_ratio is not None else (
            PRESET_STAGES[accel.preset][-1][1] if accel.preset in PRESET_STAGES else 1.0),
        "kept_fraction": round(sum(u.image_tokens_kept for u in usages) / n_img, 4),
        "kept_fraction_layer_avg": round(sum(u.image_kept_fraction_layer_avg * u.image_tokens for u in usages)
                                         / n_img, 4),
        "kv_budget": accel.kv_budget,
        "kv_policy": accel.kv_policy,
        "accuracy": round(accuracy, 4),
        "ci95": round(binomial_ci(accuracy, len(correct)), 4),
        "per_type": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_type.items())},
        "questions": len(correct),
    }


def evaluate(engine: Engine, num_questions: int, presets: list[str] | None = None, quiet: bool = False,
             seed: int = HELDOUT_SEED, kv_budgets: tuple[int, ...] | None = None,
             timing_questions: int = TIMING_QUESTIONS, checkpoint: str | None = None,
             keeps: tuple[float, ...] = KEEP_RATIOS, with_none: bool = True) -> dict:
    """The method table (and, unless kv_budgets == (), the KV table) on `num_questions` questions.

    With `checkpoint`, the rows measured so far are written there (JSON) after every row, so a
    long run that is stopped keeps what it measured."""
    from lightvlm_core.eval.kv_table import kv_rows

    questions = list(heldout_questions(num_questions, seed=seed))
    rows = []
    for name, accel in methods(presets, keeps, with_none).items():
        correct, usages = answer_all(engine, questions, accel, quiet, name)
        rows.append(row(name, accel, questions, correct, usages))
        rows[-1]["prefill_ms"] = prefill_ms(engine, questions, accel, timing_questions)
        _save(checkpoint, {"partial": True, "heldout_seed": seed, "results": rows})
    base = rows[0]["accuracy"] if with_none else None
    for r in rows:
        r["relative_to_none"] = round(r["accuracy"] / base, 4) if base else None
    result = {"model": engine.model_name, "hardware": hardware(), "heldout_seed": seed,
              "question_types": QTYPES, "results": rows, "winners": winners(rows)}
    if kv_budgets != ():
        result["kv_results"] = kv_rows(engine, num_questions, seed, quiet, kv_budgets,
                                       lambda kv: _save(checkpoint, {**result, "partial": True, "kv_results": kv}))
    return result


def _save(path: str | None, partial: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(partial, f, indent=1)


def winners(rows: list[dict]) -> dict[str, dict]:
    """At each keep ratio: the best method, and whether its lead over the runner-up exceeds the noise
    (the 95% interval of the difference of two independent binomial accuracies)."""
    out = {}
    for keep in sorted({r["keep_ratio"] for r in rows if r["method"] != "none"}, reverse=True):
        ranked = sorted((r for r in rows if r["keep_ratio"] == keep), key=lambda r: -r["accuracy"])
        if len(ranked) < 2:
            continue
        first, second = ranked[0], ranked[1]
        noise = math.hypot(first["ci95"], second["ci95"])
        out[f"{keep:g}"] = {"best": first["preset"], "runner_up": second["preset"],
                            "lead": round(first["accuracy"] - second["accuracy"], 4), "noise95": round(noise, 4),
                            "significant": first["accuracy"] - second["accuracy"] > noise}
    return out


COLUMNS = ["preset", "kept_fraction", "kept_fraction_layer_avg", "prefill_ms", "accuracy", "ci95", "relative_to_none"]


def run_eval(model: str | None, presets: list[str] | None, num_questions: int, as_json: bool,
             plot_path: str | None = None, out: str | None = None) -> int:
    from lightvlm_core.bench.common import emit
    from lightvlm_core.eval.plots import plot

    engine = load_engine(model, device="auto")
    result = evaluate(engine, num_questions, presets, quiet=as_json, checkpoint=f"{out}.partial" if out else None)
    result["profile"] = "shapes-demo"
    emit(result, as_json, out, COLUMNS)
    if not as_json:
        for r in result["results"]:
            print(f"  {r['preset']:>16}: " + json.dumps(r["per_type"]), file=sys.stdout)
        for r in result.get("kv_results", []):
            print(f"  {r['task']:>12} {r['kv_policy']:>12} {r['kv_budget']:>4}: {r['accuracy']}", file=sys.stdout)
    if plot_path:
        plot(result, plot_path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m lightvlm_core.eval.accuracy --part methods|kv`: one half of `lightvlm eval` (so the
    two halves can run as two single-threaded processes); `--merge A B` joins them and plots."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m lightvlm_core.eval.accuracy")
    p.add_argument("--part", choices=["methods", "kv"])
    p.add_argument("--merge", nargs=2, metavar=("METHODS_JSON", "KV_JSON"))
    p.add_argument("--model", default=None)
    p.add_argument("--num-questions", type=int, default=1000)
    p.add_argument("--out", required=True)
    p.add_argument("--keep", type=float, action="append", default=None, help="only these keep ratios, no `none`")
    p.add_argument("--plot", default=None)
    args = p.parse_args(argv)
    if args.merge:
        with open(args.merge[0]) as f, open(args.merge[1]) as g:
            result = {**json.load(f), "kv_results": json.load(g)["kv_results"]}
    else:
        from lightvlm_core.eval.kv_table import kv_rows

        engine = load_engine(args.model, device="auto")
        if args.part == "methods":
            keeps = tuple(args.keep) if args.keep else KEEP_RATIOS
            result = evaluate(engine, args.num_questions, kv_budgets=(), checkpoint=f"{args.out}.partial",
                              keeps=keeps, with_none=not args.keep)
        else:
            result = {"model": engine.model_name, "hardware": hardware(), "heldout_seed": HELDOUT_SEED,
                      "kv_results": kv_rows(engine, args.num_questions, HELDOUT_SEED, False, None,
                                            lambda kv: _save(f"{args.out}.partial", {"kv_results": kv}))}
    _save(args.out, result)
    if args.plot:
        from lightvlm_core.eval.plots import plot

        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
