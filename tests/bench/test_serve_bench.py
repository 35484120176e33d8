"""Smoke test of `lightvlm bench serve` and its load generator on a tiny llava (no timings asserted)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lightvlm_core.bench import loadgen, serve
from lightvlm_core.engine import load_engine

WORKLOAD = serve.ServeWorkload(concurrencies=(1, 2), requests_per_point=2, rates=(20.0,), max_new_tokens=5,
                               presets=("none", "aggressive"), overhead_repeats=1)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def result(tiny_model_dir: Callable[[str], Path]) -> dict:
    engine = load_engine(str(tiny_model_dir("llava")), device="cpu")
    return serve.run("tiny", quiet=True, loaded=engine.loaded, workload=WORKLOAD)


def test_json_shape_and_every_row_is_clean(result: dict) -> None:
    json.dumps(result)
    assert result["profile"] == "tiny" and "hardware" in result
    rows = result["results"]
    assert rows and all("speedup_vs_none" in r for r in rows)
    for row in rows:
        assert row["errors"] == 0, row
        assert row["tokens_per_request"] == [WORKLOAD.max_new_tokens], row  # streamed == max_new_tokens
        assert row["output_tokens"] == row["requests"] * WORKLOAD.max_new_tokens


def test_rows_cover_loads_presets_comparisons_and_overhead(result: dict) -> None:
    rows = result["results"]
    keys = {(r["mode"], r["system"], r["preset"], r["load"]) for r in rows}
    for c in WORKLOAD.concurrencies:
        for preset in WORKLOAD.presets:
            assert ("closed", "http", preset, f"c={c}") in keys
    assert {("open", "http", p, "20/s") for p in WORKLOAD.presets} <= keys
    systems = {r["system"] for r in rows if r["mode"] == "compare"}
    assert systems == {"transformers-sequential", "transformers-batched", "engine-none", "engine-aggressive"}
    overhead = {r["system"]: r for r in rows if r["mode"] == "overhead"}
    assert set(overhead) == {"in-process", "http"}
    assert "overhead_pct" in overhead["http"]
    none_rows = [r for r in rows if r["mode"] == "closed" and r["preset"] == "none"]
    assert all(r["speedup_vs_none"] == 1.0 for r in none_rows)


def test_plot_writes_a_png(result: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "serve.png"
    serve.plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_shapes_and_summary_without_a_server() -> None:
    async def fake_send(i: int) -> loadgen.RequestRecord:
        record = loadgen.RequestRecord(i, loadgen.time.perf_counter())
        for _ in range(3):
            await asyncio.sleep(0)
            record.token_times.append(loadgen.time.perf_counter())
        record.finish_reason, record.end = "length", loadgen.time.perf_counter()
        return record

    closed = asyncio.run(loadgen.closed_loop(fake_send, 5, 2))
    opened = asyncio.run(loadgen.open_loop(fake_send, 4, rate=1000.0, seed=1))
    assert [r.index for r in closed.records] == list(range(5))
    assert sorted(r.index for r in opened.records) == list(range(4))
    summary = loadgen.summarize(closed)
    assert summary["errors"] == 0 and summary["output_tokens"] == 15 and summary["requests"] == 5
    assert loadgen.poisson_arrivals(4, 2.0, seed=3) == loadgen.poisson_arrivals(4, 2.0, seed=3)
    assert loadgen.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_sse_parsing_records_tokens_done_and_errors() -> None:
    record = loadgen.RequestRecord(0, 0.0)
    assert not loadgen._on_sse_data(record, b'{"type":"token","index":0,"token_id":5,"text":"a"}', 1.0)
    assert not loadgen._on_sse_data(record, b'{"type":"done","finish_reason":"length"}', 2.0)
    assert loadgen._on_sse_data(record, b"[DONE]", 3.0)
    assert record.token_times == [1.0] and record.finish_reason == "length"
    failed = loadgen.RequestRecord(1, 0.0)
    loadgen._on_sse_data(failed, b'{"type":"error","error_type":"timeout","message":"late"}', 1.0)
    assert failed.error == "timeout: late"


def test_cli_runs_the_serve_bench_with_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    from lightvlm_core.cli import main

    png, out = tmp_path / "serve.png", tmp_path / "serve.json"
    assert main(["bench", "serve", "--profile", "ci-tiny", "--json", "--out", str(out), "--plot", str(png)]) == 0
    printed = json.loads(capsys.readouterr().out)  # --json: one JSON object on stdout, nothing else
    assert printed == json.loads(out.read_text())
    assert printed["profile"] == "ci-tiny" and all(r["errors"] == 0 for r in printed["results"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_overhead_is_the_median_over_interleaved_pairs() -> None:
    def row(system: str, tps: float, cpu: float) -> dict:
        return {"mode": "overhead", "system": system, "preset": "aggressive", "load": "c=8", "errors": 0,
                "output_tokens_per_s": tps, "cpu_s": cpu, "runs_output_tokens_per_s": [tps], "runs_cpu_s": [cpu]}

    closed_none = {"mode": "closed", "system": "http", "preset": "none", "load": "c=8", "errors": 0,
                   "output_tokens_per_s": 10.0}
    pairs = [(100.0, 90.0, 1.0, 1.1), (50.0, 50.0, 2.0, 2.0), (80.0, 76.0, 1.0, 1.02)]
    rows = [closed_none] + [r for ip, h, c_ip, c_h in pairs for r in (row("in-process", ip, c_ip), row("http", h, c_h))]
    out = {r["system"]: r for r in serve._finish(rows) if r["mode"] == "overhead"}
    assert out["http"]["runs"] == 3 and out["http"]["runs_output_tokens_per_s"] == [90.0, 50.0, 76.0]
    assert out["http"]["overhead_pct"] == 5.0  # per pair: 10, 0, 5 -> median 5
    assert out["http"]["overhead_cpu_pct"] == 2.0  # per pair: 10, 0, 2
    assert out["http"]["speedup_vs_none"] == 7.6  # median 76 tokens/s vs closed-loop none at c=8
