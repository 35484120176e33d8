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
    low_copy, high_copy = result["copy_bandwidth_gb_s_range"]
    assert 0 < low_copy <= high_copy and 0 < result["read_bandwidth_gb_s_range"][0]
    for row in rows:  # the bound: (weights + mean KV) / the bandwidth measured around each run
        assert low_copy <= row["copy_bandwidth_gb_s"] <= high_copy
        # each run's bound, then their median: between the bounds at the fastest and slowest bandwidth
        # seen (sizes rounded to 0.1 / 0.01 MB, bandwidths to 0.01 GB/s)
        low = (result["llm_weight_mb"] - 0.05) * 2**20 / (high_copy * 1e9 + 5e6) * 1e3
        high = (result["llm_weight_mb"] + 0.05 + row["peak_kv_mb"] + 0.005) * 2**20 / (low_copy * 1e9 - 5e6) * 1e3
        assert low - 1e-3 <= row["bound_ms"] <= high + 1e-3
        # x_bound is computed before rounding; step_ms and bound_ms are reported to 0.001 ms (a
        # tiny model's bound is a few hundredths of a ms: a percent-level rounding error)
        for bound, x in ((row["bound_ms"], row["x_bound"]), (row["read_bound_ms"], row["x_read_bound"])):
            step = row["step_ms"]
            upper = (step + 5e-4) / (bound - 5e-4) + 5e-3 if bound > 5e-4 else float("inf")
            assert (step - 5e-4) / (bound + 5e-4) - 5e-3 <= x <= upper


def test_a_decode_step_reads_every_llm_weight_once_but_the_embedding_table():
    from lightvlm_core.bench.profiles import PROFILES, build
    from lightvlm_core.engine import Engine

    engine = Engine(build(PROFILES["ci-tiny"]))
    a = engine.adapter
    everything = sum(p.numel() * p.element_size() for p in a.text_model.parameters())
    head, table = a.lm_head.weight, a.embed_tokens.weight
    tied = head.data_ptr() == table.data_ptr()
    expected = everything if tied else everything - table.numel() * table.element_size() + head.numel() * head.element_size()
    assert decode.step_weight_bytes(engine) == expected


def test_model_pair_compares_every_preset_of_the_big_model_to_the_small_models_none(monkeypatch):
    monkeypatch.setitem(prefill.PAIRS, "pair-smoke", ("ci-tiny", "ci-tiny"))
    result = prefill.run("pair-smoke", quiet=True)
    assert result["baseline"] == "ci-tiny none"
    models = [r["model"] for r in result["results"]]
    assert models[0] == "ci-tiny" and len(models) == 1 + len(prefill.configs())
    for row in result["results"][1:]:
        assert row["speedup_vs_none"] > 0 and "speedup_vs_own_none" in row
