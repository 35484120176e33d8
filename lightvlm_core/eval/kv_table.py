"""The KV table of `lightvlm eval`: every KV policy at budgets 16-128 on two decode tasks.

- `describe`: `Describe the image.` on the held-out scenes (lists every object, left to right);
- `describe4`: the same on scenes with exactly four objects, so the answer is the longest the demo
  model gives and its last object is named ~10 tokens in: the image must survive compaction until
  late in the answer.
No token reduction; the prompt (~265 entries per layer) is larger than every budget, so every row
is compacted from its first decode step on.
"""

from __future__ import annotations

from lightvlm_core.demo.scenes import describe, heldout_questions, heldout_rng, make_scene
from lightvlm_core.engine import Engine
from lightvlm_core.kv.registry import kv_policy_names
from lightvlm_core.types import AccelerationConfig

KV_BUDGETS = (16, 32, 64, 128)
DESCRIBE = "Describe the image."


def describe_questions(num_questions: int, seed: int) -> list[tuple]:
    return [q for q in heldout_questions(num_questions, seed=seed) if q[3] == "describe"]


def four_object_questions(n: int, seed: int) -> list[tuple]:
    """n held-out scenes with four objects each (seed namespace `heldout/{seed + 1}`, never training)."""
    out = []
    for i in range(n):
        img, objs = make_scene(heldout_rng(seed + 1, i), n_objects=4)
        out.append((img, DESCRIBE, describe(objs), "describe4"))
    return out


def kv_rows(engine: Engine, num_questions: int, seed: int, quiet: bool,
            budgets: tuple[int, ...] | None = None, on_row=None) -> list[dict]:
    from lightvlm_core.eval.accuracy import answer_all, row

    tasks = {"describe": describe_questions(num_questions, seed)}
    tasks["describe4"] = four_object_questions(len(tasks["describe"]), seed)
    rows = []
    for task, questions in tasks.items():
        base = None
        configs = [(None, None)] + [(p, b) for p in kv_policy_names() for b in budgets or KV_BUDGETS]
        for policy, budget in configs:
            accel = AccelerationConfig("none", kv_budget=budget, kv_policy=policy)
            name = f"{task} {policy or 'no budget'}{f' {budget}' if budget else ''}"
            correct, usages = answer_all(engine, questions, accel, quiet, name)
            r = row(name, accel, questions, correct, usages)
            r["task"], r["kv_policy"] = task, policy or "none"
            base = r["accuracy"] if base is None else base
            r["relative_to_none"] = round(r["accuracy"] / base, 4) if base else None
            rows.append(r)
            if on_row:
                on_row(rows)
    return rows
