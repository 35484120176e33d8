"""`lightvlm bench serve` and its load generator, against our real service on a tiny llava started
as a child process (no timings asserted). The "peer" in the side-by-side tests is a real
OpenAI-compatible server too: our own service, measured as a peer (no acceleration field)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lightvlm_core.bench import loadgen, serve, service_proc

WORKLOAD = serve.ServeWorkload(concurrencies=(1, 2), requests_per_point=2, rates=(20.0,), max_new_tokens=5,
                               presets=("none", "aggressive"), compare=False, rounds=2, scenes=3)


@pytest.fixture(scope="module")
def service(tiny_model_dir: Callable[[str], Path]) -> Iterator[service_proc.RunningService]:
    model = str(tiny_model_dir("llava"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with service_proc.running_service(model, "tiny-llava", device="cpu", dtype="float32", max_batch_size=2,
                                      max_new_tokens=16) as running:
        yield running
    with pytest.raises(ProcessLookupError):  # stopped by PID, and reaped
        os.kill(running.pid, 0)


@pytest.fixture(scope="module")
def result(service: service_proc.RunningService) -> dict:
    peer = serve.Target("peer", service.url, "tiny-llava")
    return serve.run("tiny", quiet=True, workload=WORKLOAD, ours_url=service.url, targets=[peer])


def test_every_target_preset_and_load_is_measured_cleanly(result: dict) -> None:
    json.dumps(result)
    rows = result["results"]
    keys = {(r["mode"], r["system"], r["preset"], r["load"]) for r in rows}
    for c in WORKLOAD.concurrencies:
        assert {("closed", "ours", "none", f"c={c}"), ("closed", "ours", "aggressive", f"c={c}"),
                ("closed", "peer", "-", f"c={c}")} <= keys
    assert ("open", "peer", "-", "20/s") in keys and ("open", "ours", "none", "20/s") in keys
    assert len(rows) == len(keys) == 3 * (len(WORKLOAD.concurrencies) + len(WORKLOAD.rates))
    for row in rows:
        assert row["errors"] == 0, row
        assert row["runs"] == WORKLOAD.rounds and len(row["runs_output_tokens_per_s"]) == WORKLOAD.rounds
        assert len(row["settle_s"]) == WORKLOAD.rounds and all(0 <= s <= 10.5 for s in row["settle_s"])
        assert row["tokens_per_request"] == [WORKLOAD.max_new_tokens], row  # usage == max_tokens (ignore_eos)
        assert row["output_tokens"] == row["requests"] * WORKLOAD.max_new_tokens
        assert row["ttft_ms_p50"] > 0 and row["tpot_ms_p50"] > 0 and row["output_tokens_per_s"] > 0
        lo, hi = row["prompt_tokens"]
        assert 0 < lo <= hi  # every target sees the same scenes and questions


def test_ratios_and_the_side_by_side_table(result: dict) -> None:
    rows = result["results"]
    assert result["peer"] == "peer" and [t["name"] for t in result["targets"]] == ["ours", "peer"]
    for row in rows:
        if row["system"] == "peer":
            assert row["vs_peer"] == 1.0 and "speedup_vs_none" not in row
        if row["system"] == "ours" and row["preset"] == "none":
            assert row["speedup_vs_none"] == 1.0
    table = result["markdown"].splitlines()
    assert table[0].startswith("| mode | load | server | tok/s | x peer | TTFT p50 ms | TPOT p50 ms |")
    assert sum("| peer |" in line for line in table) == len(WORKLOAD.concurrencies) + len(WORKLOAD.rates)


def test_plot_writes_a_png(result: dict, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    path = tmp_path / "serve.png"
    serve.plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_measures_a_peer_only(service: service_proc.RunningService, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from lightvlm_core.cli import main

    monkeypatch.setitem(serve.WORKLOADS, "ci-tiny", WORKLOAD)
    out = tmp_path / "serve.json"
    argv = ["bench", "serve", "--profile", "ci-tiny", "--json", "--out", str(out), "--no-ours", "--rounds", "1",
            "--target", service.url, "--target-model", "tiny-llava", "--target-name", "vllm"]
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)  # --json: one JSON object on stdout, nothing else
    assert printed == json.loads(out.read_text())
    assert {r["system"] for r in printed["results"]} == {"vllm"}
    assert all(r["errors"] == 0 and r["runs"] == 1 for r in printed["results"])


def test_a_wrong_model_name_fails_before_any_load(service: service_proc.RunningService) -> None:
    with pytest.raises(RuntimeError, match="not 'other'"):
        serve.run("tiny", quiet=True, workload=WORKLOAD, ours=False,
                  targets=[serve.Target("peer", service.url, "other")])


def test_scene_workload_is_distinct_scenes_with_questions() -> None:
    items = serve._scene_items(4, seed=0)
    assert len({img.tobytes() for img, _ in items}) == 4
    assert all(img.size == (224, 224) and question.strip() for img, question in items)
    assert serve._scene_items(4, seed=0)[2][1] == items[2][1]  # reproducible


# ---- the load generator without a server ---------------------------------------------------------


def test_load_shapes_and_summary() -> None:
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


VLLM_STREAM = [  # the shapes of vLLM's chunks (pydantic JSON, no spaces)
    b'{"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"logprobs":null,"finish_reason":null}],"usage":null}',
    b'{"id":"c","choices":[{"index":0,"delta":{"content":"a"},"logprobs":null,"finish_reason":null}]}',
    b'{"id":"c","choices":[{"index":0,"delta":{"content":" \\"b\\""},"logprobs":null,"finish_reason":null}]}',
    b'{"id":"c","choices":[{"index":0,"delta":{"content":"c"},"logprobs":null,"finish_reason":"length",'
    b'"stop_reason":null}]}',
    b'{"id":"c","choices":[],"usage":{"prompt_tokens":263,"total_tokens":287,"completion_tokens":24}}',
    b"[DONE]",
]


def test_stream_parsing_counts_content_chunks_and_reads_usage() -> None:
    record = loadgen.RequestRecord(0, 0.0)
    done = [loadgen.on_chunk(record, data, float(t)) for t, data in enumerate(VLLM_STREAM)]
    assert done == [False] * 5 + [True]
    assert record.token_times == [1.0, 2.0, 3.0]  # the role-only chunk is not a token
    assert record.finish_reason == "length" and record.usage_tokens == 24 and record.prompt_tokens == 263
    assert record.num_tokens == 24 and record.num_chunks == 3  # usage wins for throughput
    record.end = 24.0
    assert record.ttft_s == 1.0 and record.tpot_s == 1.0  # (24 - 1) s over 23 tokens after the first
    spaced = loadgen.RequestRecord(1, 0.0)
    loadgen.on_chunk(spaced, b'{"choices": [{"delta": {"content": "x"}, "finish_reason": null}]}', 1.0)
    loadgen.on_chunk(spaced, b'{"choices": [{"delta": {"content": null}, "finish_reason": null}]}', 2.0)
    assert spaced.token_times == [1.0] and spaced.num_tokens == 1  # no usage: chunks are the count


def test_stream_errors_are_recorded() -> None:
    failed = loadgen.RequestRecord(0, 0.0)
    loadgen.on_chunk(failed, b'{"error":{"type":"timeout","message":"late","code":503}}', 1.0)
    assert failed.error == "timeout: late"
    summary = loadgen.summarize(loadgen.LoadResult([failed], 1.0))
    assert summary["errors"] == 1 and summary["first_error"] == "timeout: late" and summary["output_tokens"] == 0


def test_rounds_merge_to_medians_and_ratios() -> None:
    def row(system: str, preset: str, tps: float, itl: float) -> dict:
        return {"mode": "closed", "system": system, "preset": preset, "load": "c=8", "errors": 0, "first_error": None,
                "tokens_per_request": [24], "output_tokens_per_s": tps, "requests_per_s": 1.0, "wall_s": 1.0,
                "ttft_ms_p50": 1.0, "ttft_ms_p99": 1.0, "itl_ms_p50": itl, "itl_ms_p99": itl, "e2e_ms_p50": 1.0,
                "e2e_ms_p99": 1.0, "tpot_ms_p50": itl, "tpot_ms_p99": itl}

    rows = [row("ours", "none", 100, 5), row("ours", "aggressive", 150, 4), row("vllm", "-", 200, 6),
            row("ours", "none", 90, 7), row("ours", "aggressive", 180, 3), row("vllm", "-", 180, 6),
            row("ours", "none", 120, 6), row("ours", "aggressive", 160, 9), row("vllm", "-", 190, 8)]
    out = {(r["system"], r["preset"]): r for r in serve._finish(rows, "vllm")}
    assert out[("ours", "none")]["output_tokens_per_s"] == 100 and out[("ours", "none")]["itl_ms_p50"] == 6
    assert out[("ours", "none")]["runs_output_tokens_per_s"] == [100, 90, 120]
    assert out[("ours", "none")]["vs_peer"] == round(100 / 190, 2)
    assert out[("ours", "aggressive")]["speedup_vs_none"] == 1.6 and out[("vllm", "-")]["vs_peer"] == 1.0
