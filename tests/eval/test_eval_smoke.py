"""`lightvlm eval` machinery end to end on a tiny random model (accuracy itself is meaningless here)."""

from __future__ import annotations

from lightvlm_core.engine import load_engine
from lightvlm_core.eval import accuracy


def test_eval_rows_methods_fractions_and_plot(tiny_model_dir, tmp_path):
    engine = load_engine(str(tiny_model_dir("llava")), device="cpu")
    result = accuracy.evaluate(engine, num_questions=10, presets=["aggressive"], quiet=True)
    rows = {r["preset"]: r for r in result["results"]}
    assert set(rows) == {"none", "aggressive", "fastv@0.03", "random@0.03"} | {
        f"none+kv{b}" for b in accuracy.KV_BUDGETS}
    assert rows["none"]["kept_fraction"] == 1.0 and rows["none"]["relative_to_none"] in (1.0, None)
    for name in ("aggressive", "fastv@0.03", "random@0.03"):
        assert rows[name]["kept_fraction"] < 0.1 and rows[name]["questions"] == 10
        assert set(rows[name]["per_type"]) <= set(result["question_types"])
    assert rows["aggressive"]["method"] == "lightvlm" and rows["fastv@0.03"]["method"] == "fastv"
    assert all(rows[f"none+kv{b}"]["kv_budget"] == b for b in accuracy.KV_BUDGETS)
    accuracy.plot(result, str(tmp_path / "acc.png"))
    assert (tmp_path / "acc.png").stat().st_size > 1000
