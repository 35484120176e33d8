"""Plots of `lightvlm eval`: accuracy vs kept image tokens per method, and accuracy vs KV budget."""

from __future__ import annotations


def plot(result: dict, path: str) -> None:
    """Two panels: reduction methods (left), KV policies per task (right); PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    rows = result["results"]
    base = next(r for r in rows if r["preset"] == "none")
    left.axhline(base["accuracy"], color="grey", linestyle="--", label="none (all image tokens)")
    for method in dict.fromkeys(r["method"] for r in rows if r["method"] != "none"):
        pts = sorted((r["kept_fraction"], r["accuracy"]) for r in rows if r["method"] == method)
        left.plot(*zip(*pts), marker="o", label=method, linewidth=2.5 if method == "lightvlm" else 1.2)
    left.set_xscale("log")
    left.set_xlabel("image tokens kept after the last stage (fraction, log scale)")
    left.set_ylabel("held-out exact-match accuracy")
    left.set_title(f"{result.get('model', '')}: {base['questions']} questions")
    left.legend(fontsize=8)
    kv = result.get("kv_results", [])
    styles = {"describe": "-", "describe4": "--"}
    for task in dict.fromkeys(r["task"] for r in kv):
        for policy in dict.fromkeys(r["kv_policy"] for r in kv if r["kv_budget"]):
            pts = sorted((r["kv_budget"], r["accuracy"]) for r in kv if r["task"] == task and r["kv_policy"] == policy)
            right.plot(*zip(*pts), styles.get(task, ":"), marker="o", label=f"{policy} ({task})")
    right.set_xscale("log", base=2)
    right.set_xlabel("KV budget (entries per layer)")
    right.set_ylabel("accuracy")
    right.set_title("KV policies: describe (solid), four objects (dashed)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
