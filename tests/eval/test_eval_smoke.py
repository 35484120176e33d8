"""`lightvlm eval` machinery end to end on a tiny random model (accuracy itself is meaningless here)."""

from __future__ import annotations

from lightvlm_core.engine import load_engine
from lightvlm_core.eval import accuracy, kv_table
from lightvlm_core.eval.plots import plot
from lightvlm_core.kv.registry import kv_policy_names


def test_eval_rows_methods_fractions_kv_table_and_plot(tiny_model_dir, tmp_path):
    engine = load_engine(str(tiny_model_dir("llava")), device="cpu")
    result = accuracy.evaluate(engine, num_questions=10, presets=["aggressive", "cdpruner"], quiet=True,
                               kv_budgets=(16, 64), timing_questions=2)
    rows = {r["preset"]: r for r in result["results"]}
    assert set(rows) == {"none", "aggressive"} | {f"cdpruner@{k:g}" for k in accuracy.KEEP_RATIOS}
    assert rows["none"]["kept_fraction"] == 1.0 and rows["none"]["relative_to_none"] in (1.0, None)
    for name in ("aggressive", "cdpruner@0.03"):
        assert rows[name]["kept_fraction"] < 0.1 and rows[name]["questions"] == 10
        assert set(rows[name]["per_type"]) <= set(result["question_types"])
        assert rows[name]["prefill_ms"] > 0 and 0 < rows[name]["ci95"] < 1
    # pre-LLM: every layer sees the reduced set; in-LLM: the first layers see everything
    assert rows["cdpruner@0.03"]["kept_fraction_layer_avg"] == rows["cdpruner@0.03"]["kept_fraction"]
    assert rows["aggressive"]["kept_fraction_layer_avg"] > rows["aggressive"]["kept_fraction"]
    assert rows["aggressive"]["method"] == "lightvlm" and rows["cdpruner@0.35"]["method"] == "cdpruner"
    assert set(result["winners"]) == {"0.03"}  # the only ratio with two methods here
    kv = result["kv_results"]
    assert {(r["task"], r["kv_policy"], r["kv_budget"]) for r in kv if r["kv_budget"]} == {
        (t, p, b) for t in ("describe", "describe4") for p in kv_policy_names() for b in (16, 64)}
    assert all(r["questions"] == kv[0]["questions"] > 0 for r in kv)
    plot(result, str(tmp_path / "acc.png"))
    assert (tmp_path / "acc.png").stat().st_size > 1000


def test_four_object_task_has_four_objects_and_is_disjoint_from_the_test_scenes():
    four = kv_table.four_object_questions(5, accuracy.HELDOUT_SEED)
    assert all(gold.count(",") + gold.count(" and ") == 3 for _, _, gold, _ in four)
    assert accuracy.VALIDATION_SEED not in (accuracy.HELDOUT_SEED, accuracy.HELDOUT_SEED + 1)
