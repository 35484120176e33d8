"""The prefill and decode benchmarks run end to end (tiny profile; no timing assertions)."""

from __future__ import annotations

import json

from lightvlm_core.bench import decode, prefill
from lightvlm_core.cli import main


def test_prefill_bench_reports_every_preset_next_to_none(capsys):
    assert main(["bench", "prefill", "--profile", "ci-tiny", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["profile"] == "ci-tiny" and "cpu" in result["hardware"]
    rows = {r["preset"]: r for r in result["results"]}
    assert set(rows) == set(prefill.configs())
    assert rows["none"]["speedup_vs_none"] == 1.0 and rows["none"]["kept_fraction_final"] == 1.0
    n = rows["none"]["image_tokens"]
    assert rows["aggressive"]["image_tokens_kept"] < rows["balanced"]["image_tokens_kept"] < n
    for row in rows.values():
        assert row["prefill_ms_median"] > 0 and 0 <= row["vision_share"] <= 1 and row["runs"] == 2
    assert 0 < result["shape"]["vision_flops_share"] < 1


def test_decode_bench_covers_long_and_batched_cases():
    result = decode.run("ci-tiny", quiet=True)
    rows = result["results"]
    cases = {(r["case"], r["batch"]) for r in rows}
    assert cases == {("long", 1), ("throughput", 1), ("throughput", 2)}
    assert {r["preset"] for r in rows} == {"none", "kv", "aggressive", "aggressive+kv"}
    by = {(r["case"], r["batch"], r["preset"]): r for r in rows}
    for case, batch in cases:
        assert by[(case, batch, "none")]["speedup_vs_none"] == 1.0
        assert by[(case, batch, "kv")]["peak_kv_mb"] <= by[(case, batch, "none")]["peak_kv_mb"]


def test_model_pair_compares_every_preset_of_the_big_model_to_the_small_models_none(monkeypatch):
    monkeypatch.setitem(prefill.PAIRS, "pair-smoke", ("ci-tiny", "ci-tiny"))
    result = prefill.run("pair-smoke", quiet=True)
    assert result["baseline"] == "ci-tiny none"
    models = [r["model"] for r in result["results"]]
    assert models[0] == "ci-tiny" and len(models) == 1 + len(prefill.configs())
    for row in result["results"][1:]:
        assert row["speedup_vs_none"] > 0 and "speedup_vs_own_none" in row
