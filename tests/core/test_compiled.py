"""The compiled decode step (lightvlm_core/compiled_decode.py) and prefill (compiled_prefill.py):
the same greedy tokens as the eager passes, for single rows and ragged batches, with and without
token merging; eager where they do not apply (sliding windows, bidirectional images, KV policies
that read decode-time scores) and after a failed compile; no graph compiled after warm-up whatever
the batch or prompt length. Compiling costs seconds per model, so few families run."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.eval_frame import _debug_get_cache_entry_list
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters

from lightvlm_core import compiled_decode, compiled_prefill, cpu_linear, decode_step, packed_weights, warmup
from lightvlm_core.engine import Engine
from lightvlm_core.compiling import compile_enabled
from lightvlm_core.runner import load_runner
from tests.core.ragged_batch import requests, tokens

COMPILED_FAMILIES = ("llava", "qwen2_vl", "qwen3_vl")  # plain RoPE, M-RoPE, q/k norms + DeepStack


@pytest.fixture(scope="module", params=COMPILED_FAMILIES)
def pair(request, tiny_model_dir) -> tuple[Engine, Engine]:
    """(eager engine, compiled engine) on one tiny model, the compiled one warmed up."""
    model = str(tiny_model_dir(request.param))
    compiled = load_runner(model, device="cpu", compile=True)
    warmup.warm_up(compiled)
    return Engine(load_runner(model, device="cpu")), Engine(compiled)


@pytest.mark.parametrize("preset", ["none", "aggressive"])
def test_compiled_engine_gives_the_eager_tokens_alone_and_in_a_ragged_batch(pair, preset) -> None:
    eager, compiled = pair
    for part in ("compiled_decode", "compiled_prefill"):
        assert compiled.runner.info()[part] and not eager.runner.info()[part]
    batch = requests(preset=preset)
    assert tokens(compiled, batch) == tokens(eager, batch)
    for one in batch:
        assert tokens(compiled, [one]) == tokens(eager, [one])


def test_compiled_prefill_multiplies_by_packed_weights_where_it_runs_on_onednn(pair, monkeypatch) -> None:
    _, compiled = pair
    found = []

    def spy(weight):
        copy = real(weight)
        found.append(copy is not weight)
        return copy

    real = packed_weights.packed
    monkeypatch.setattr(packed_weights, "packed", spy)
    tokens(compiled, requests()[:1])
    assert all(found) and bool(found) == cpu_linear.onednn_faster()
    assert (compiled.runner.info()["packed_weight_mb"] > 0) == cpu_linear.onednn_faster()


def test_warm_up_leaves_nothing_to_compile_for_other_batch_sizes(pair) -> None:
    _, compiled = pair
    before = counters["stats"]["unique_graphs"]
    programs = dict(compiled.runner.compiled_decode._programs)
    assert set(programs) == {"one", "few", "many"}
    tokens(compiled, requests())  # batch 3, ragged
    tokens(compiled, requests()[:1])  # batch 1, another length
    tokens(compiled, requests(preset="aggressive"))  # merged prompts: other lengths from layer to layer
    tokens(compiled, requests() + requests())  # batch 6: beyond the few-rows graphs
    assert counters["stats"]["unique_graphs"] == before
    assert compiled.runner.compiled_decode._programs == programs


def test_decode_programs_run_without_dynamo_guard_checks(pair) -> None:
    """The step's programs are called directly, not through dynamo's frame hook (which would check
    every guard on the model before each step): no frame of the compiled bodies is in its cache."""
    _, compiled = pair
    tokens(compiled, requests())
    for body in (compiled_decode._layers, compiled_decode._few_rows_layers, compiled_decode._kernel_rows_layers,
                 compiled_decode._onednn_layers):
        assert _debug_get_cache_entry_list(body.__code__) == []
    assert all(not program._guard_check_enabled for program in compiled.runner.compiled_decode._programs.values())


def test_decode_programs_skip_inductors_size_asserts(pair) -> None:
    """The programs are compiled without inductor's per-op output-stride checks (hundreds of Python
    calls a step): none of them runs during a generation's decode steps."""
    import cProfile
    import pstats

    _, compiled = pair
    compiled.add([compiled.prepare(r) for r in requests()])  # the prefill (its graphs keep them)
    profiler = cProfile.Profile()
    profiler.enable()
    while compiled.num_running:
        compiled.step()
    profiler.disable()
    called = {name for (_, _, name) in pstats.Stats(profiler).stats}
    assert "<built-in method torch._C._dynamo.guards.assert_size_stride>" not in called
    assert "assert_tensor_metadata" not in called


def test_steps_of_few_rows_run_their_linears_row_by_row(pair) -> None:
    """Up to `few_rows` rows the step runs a program with row linears (our C++ kernel up to
    KERNEL_ROWS where built, else inductor's multiply-sums up to FEW_ROWS), beyond it the BLAS one."""
    eager, compiled = pair
    step = compiled.runner.compiled_decode
    kernel = cpu_linear.row_kernel_ready()
    rows = compiled_decode._kernel_rows_layers if kernel else compiled_decode._few_rows_layers
    assert step._bodies["one"].func is step._bodies["few"].func is rows
    assert step._bodies["many"].func in (compiled_decode._layers, compiled_decode._onednn_layers)
    assert step.few_rows in ((compiled_decode.KERNEL_ROWS, compiled_decode.FEW_ROWS) if kernel
                             else (compiled_decode.FEW_ROWS,))
    calls = {"one": 0, "few": 0, "many": 0}
    real = dict(step._programs)

    def counting(kind, program):
        def call(*args):
            calls[kind] += 1
            return program(*args)
        return call

    step._programs = {kind: counting(kind, program) for kind, program in real.items()}
    six = "few" if step.few_rows >= 6 else "many"
    try:
        assert tokens(compiled, requests()) == tokens(eager, requests())  # 3 rows: 7 steps
        assert calls == {"one": 0, "few": 7, "many": 0}
        assert tokens(compiled, requests() + requests()) == tokens(eager, requests() + requests())
        assert calls[six] == (14 if six == "few" else 7) and sum(calls.values()) == 14
        nine = [requests() + requests() + requests() for _ in range(2)]
        assert tokens(compiled, nine[0]) == tokens(eager, nine[1])
        assert calls["many"] == 7 + (six == "many") * 7
        assert tokens(compiled, requests()[:1]) == tokens(eager, requests()[:1])
        assert calls["one"] == 7
    finally:
        step._programs = real
    assert warmup.WARM_UP_BATCHES == (1, 2, compiled_decode.KERNEL_ROWS + 1)  # one per program of the step


kernel_modes = [cpu_linear.KernelRowLinear] if cpu_linear.kernels_built() else []


@pytest.mark.parametrize("mode", [cpu_linear.RowLinear, cpu_linear.OneDnnLinear] + kernel_modes)
@pytest.mark.parametrize("shape", [(1, 1, 24), (3, 1, 24), (4, 24), (2, 7, 24), (1, 40), (2, 16), (9, 2, 17)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("outputs", [43, 101])
def test_rerouted_linears_equal_f_linear(mode, shape, bias, outputs) -> None:
    """Widths off the kernels' 16-lane vectors, output counts off their tiles and within one or
    several of the row kernel's parallel tasks (48 outputs each), 1-18 rows."""
    torch.manual_seed(0)
    width = shape[-1]
    x, weight = torch.randn(shape), torch.randn(outputs, width)
    b = torch.randn(outputs) if bias else None
    with mode():
        got = F.linear(x, weight, b)
        flat = x.reshape(-1, width)
        assert torch.equal(torch.mm(flat, weight.T), flat @ weight.T)  # other ops pass
    assert got.shape == F.linear(x, weight, b).shape
    assert torch.allclose(got, F.linear(x, weight, b), atol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])  # a compiled (fixed-size) vision tower; q/k/v biases
@pytest.mark.parametrize("onednn", [False, True])
def test_larger_steps_and_prefill_give_the_eager_tokens_with_either_large_linear(tiny_model_dir, monkeypatch,
                                                                                  onednn, family) -> None:
    """Whichever kernel the start-up measurement picks for linears of many rows (cpu_linear.py)."""
    for module in (compiled_decode, compiled_prefill):
        monkeypatch.setattr(module, "onednn_faster", lambda: onednn)
    model = str(tiny_model_dir(family))
    compiled = Engine(load_runner(model, device="cpu", compile=True))
    six = requests() + requests(preset="aggressive")
    assert tokens(compiled, six) == tokens(Engine(load_runner(model, device="cpu")), six)
    assert isinstance(cpu_linear.onednn_faster(), bool)


def test_every_prefill_layer_runs_compiled_and_fixed_size_towers_too(pair, monkeypatch) -> None:
    _, compiled = pair
    prefill = compiled.runner.compiled_prefill
    real, results = prefill.layer, []
    monkeypatch.setattr(prefill, "layer", lambda *args: results.append(real(*args)) or results[-1])
    tokens(compiled, requests()[:1])
    assert len(results) == len(compiled.adapter.layers) and all(r is not None for r in results)
    # CLIP's input has one size; Qwen's towers take a patch count that varies per image
    tower = getattr(compiled.adapter.model.model, "vision_tower", None)
    assert (prefill.vision is not None) == (compiled.adapter.family == "llava")
    assert prefill.vision is None or tower.forward is prefill.vision


def test_kv_eviction_without_scores_runs_compiled_and_gives_the_eager_tokens(pair) -> None:
    eager, compiled = pair
    batch = requests(n_tokens=12, kv={"kv_budget": 24, "kv_policy": "streaming"})
    assert tokens(compiled, batch) == tokens(eager, batch)


def test_kv_policies_reading_decode_scores_run_compiled_and_give_the_eager_tokens(pair) -> None:
    """Heavy-hitter eviction reads the attention of every decode step: the compiled step adds it to
    the scores as the eager one does, alone and beside rows that do not score."""
    eager, compiled = pair
    step = compiled.runner.compiled_decode
    real, calls = dict(step._programs), []
    step._programs = {kind: (lambda program: lambda *a: calls.append(1) or program(*a))(program)
                      for kind, program in real.items()}
    try:
        scored = requests(n_tokens=12, kv={"kv_budget": 24, "kv_policy": "heavy_hitter"})
        assert tokens(compiled, scored) == tokens(eager, scored)
        assert len(calls) == 11
        mixed = scored[:2] + requests(n_tokens=12)[2:]
        assert tokens(compiled, mixed) == tokens(eager, mixed)
        assert tokens(compiled, scored[:1]) == tokens(eager, scored[:1])
    finally:
        step._programs = real


def test_steps_it_does_not_apply_to_run_eagerly(tiny_model_dir, monkeypatch) -> None:
    """A model with sliding-window layers and bidirectional images (Gemma 3), whose vision tower
    runs compiled."""
    def fail(*args, **kwargs):
        raise AssertionError("the compiled layers ran")

    monkeypatch.setattr(compiled_decode.CompiledDecode, "__call__", fail)
    sliding = Engine(load_runner(str(tiny_model_dir("gemma3")), device="cpu", compile=True))
    assert not sliding.runner.compiled_decode.applies(sliding.adapter, sliding.runner.cache)
    assert sliding.runner.compiled_prefill.vision is not None
    assert tokens(sliding, requests()) == tokens(Engine(load_runner(str(tiny_model_dir("gemma3")), device="cpu")),
                                                 requests())


def broken_compiler(calls: list):
    """A stand-in for a compiled function whose compilation fails (e.g. no C++ compiler)."""
    def broken(*args, **kwargs):
        calls.append(1)
        raise BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None)

    return broken


def test_a_failed_compile_falls_back_to_eager_for_good(tiny_model_dir, monkeypatch, caplog) -> None:
    """E.g. no C++ compiler on the machine: one warning, then every step eager, tokens unchanged."""
    model = str(tiny_model_dir("llava"))
    runner = load_runner(model, device="cpu", compile=True)
    calls = []
    monkeypatch.setattr(compiled_decode, "compile_program", broken_compiler(calls))
    with caplog.at_level(logging.WARNING, logger="lightvlm_core.compiled_decode"):
        got = tokens(Engine(runner), requests())
    assert got == tokens(Engine(load_runner(model, device="cpu")), requests())
    assert len(calls) == 1 and runner.compiled_decode.failed
    assert "could not be compiled" in caplog.text


def test_a_failed_prefill_compile_falls_back_to_eager_for_good(tiny_model_dir, monkeypatch, caplog) -> None:
    """The decoder layers and the vision tower each fall back on their own, with one warning each."""
    model = str(tiny_model_dir("llava"))
    runner = load_runner(model, device="cpu", compile=True)
    calls = []
    prefill = runner.compiled_prefill
    monkeypatch.setattr(prefill, "_fn", broken_compiler(calls))
    monkeypatch.setattr(prefill.vision, "compiled", broken_compiler(calls))
    with caplog.at_level(logging.WARNING, logger="lightvlm_core.compiled_prefill"):
        got = tokens(Engine(runner), requests())
    assert got == tokens(Engine(load_runner(model, device="cpu")), requests())
    assert len(calls) == 2 and prefill.failed
    assert runner.adapter.model.model.vision_tower.forward == prefill.vision.eager
    assert "prefill layers could not be compiled" in caplog.text and "vision tower could not" in caplog.text


def test_compile_is_a_setting_and_a_serve_flag(monkeypatch) -> None:
    from app.cli import serve_parser
    from app.settings import Settings

    monkeypatch.delenv("LIGHTVLM_COMPILE", raising=False)
    assert Settings().compile is True
    monkeypatch.setenv("LIGHTVLM_COMPILE", "0")
    assert Settings().compile is False
    assert serve_parser().parse_args(["--no-compile"]).no_compile
    # the in-process benches read the same variable the same way
    assert compile_enabled({}) and compile_enabled({"LIGHTVLM_COMPILE": "1"})
    assert not any(compile_enabled({"LIGHTVLM_COMPILE": v}) for v in ("0", "false", "False", "off"))


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("ragged", [False, True])
def test_decode_attention_op_appends_and_attends_as_the_eager_cache_and_sdpa(groups, ragged) -> None:
    """The op's grouped-query attention (query heads folded onto their KV head, no K/V expansion)
    and its cache write equal `BatchedKVCache.append` + grouped-query SDPA with the key mask."""
    from lightvlm_core.kv.cache import BatchedKVCache

    torch.manual_seed(0)
    layers, batch, kv_heads, dim = 2, 3, 2, 16
    lengths = [[5, 9, 7], [4, 4, 4]] if ragged else [[6, 6, 6], [4, 4, 4]]

    def cache() -> BatchedKVCache:
        keys = [torch.zeros(batch, kv_heads, 12, dim) for _ in range(layers)]
        for buf, lens in zip(keys, lengths):
            for row, n in enumerate(lens):
                buf[row, :, :n] = torch.randn(kv_heads, n, dim, generator=torch.Generator().manual_seed(row + n))
        values = [k.flip(-1).clone() for k in keys]
        return BatchedKVCache(keys, values, torch.tensor(lengths), [None] * layers)

    q = torch.randn(batch, kv_heads * groups, 1, dim)
    k, v = torch.randn(batch, kv_heads, dim), torch.randn(batch, kv_heads, dim)
    eager, compiled = cache(), cache()
    eager.reserve(1)
    keys, values, mask = eager.append(0, k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask[:, None, None, :], scale=0.3, enable_gqa=groups > 1)
    compiled.reserve(1)
    rows, masks, plan = compiled_decode.op_layout(compiled)
    spare = torch.full((batch, kv_heads, 12), 7.0)
    got = torch.ops.lightvlm.decode_attention(q, k, v, compiled.keys[0], compiled.values[0], compiled.lengths, rows,
                                              masks, plan, spare, torch.zeros(batch, dtype=torch.bool), 0, 0.3)
    assert bool(plan[1, 0]) == ragged and not plan[2].any()
    assert torch.equal(spare, torch.full((batch, kv_heads, 12), 7.0))  # not a scoring step: not read
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(compiled.lengths, eager.lengths)
    assert torch.equal(compiled.keys[0], eager.keys[0]) and torch.equal(compiled.values[0], eager.values[0])


def test_decode_attention_op_scores_as_the_eager_step() -> None:
    """Where the cache keeps scores, the op adds each entry's attention probability (summed over
    the query heads of its KV head) for the scoring rows, as `decode_step.attend_and_score` does."""
    from lightvlm_core.kv.cache import BatchedKVCache

    torch.manual_seed(1)
    batch, kv_heads, groups, dim = 3, 2, 2, 16
    keys = [torch.randn(batch, kv_heads, 12, dim)]
    values = [torch.randn(batch, kv_heads, 12, dim)]
    cache = BatchedKVCache(keys, values, torch.tensor([[5, 9, 7]]), [None])
    cache.enable_scores()
    cache.scores[0].uniform_()
    cache.score_rows = torch.tensor([True, False, True])
    before = cache.scores[0].clone()
    q = torch.randn(batch, kv_heads * groups, 1, dim)
    k, v = torch.randn(batch, kv_heads, dim), torch.randn(batch, kv_heads, dim)
    cache.reserve(1)
    rows, masks, plan = compiled_decode.op_layout(cache)
    assert (plan[2] == compiled_decode.SCORING).all()
    pos = cache.lengths[0].clone()
    got = torch.ops.lightvlm.decode_attention(q, k, v, cache.keys[0], cache.values[0], cache.lengths, rows, masks,
                                              plan, cache.scores[0], cache.decode_scored_rows(), 0, 0.3)
    span = int(plan[0, 0])
    expected_scores = before.clone()
    expected_scores[torch.arange(batch), :, pos] = 0.0  # the new entries' scores start from 0, as in append
    expected = decode_step.attend_and_score(q, cache.keys[0][:, :, :span], cache.values[0][:, :, :span],
                                        masks[0, :, :span], 0.3, groups, expected_scores, cache.score_rows)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(cache.scores[0], expected_scores, atol=1e-6)
    assert torch.equal(cache.scores[0][1], expected_scores[1])  # a row that does not score: only its new slot reset
    assert not torch.equal(expected_scores[1], before[1])
    before[torch.arange(batch), :, pos] = 0.0
    added = (cache.scores[0] - before)[0].sum(dim=-1)  # each KV head's groups: probabilities summing to 1
    assert torch.allclose(added, torch.full((kv_heads,), float(groups)), atol=1e-5)
