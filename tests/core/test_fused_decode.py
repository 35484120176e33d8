"""The fused decode step (lightvlm_core/fused_decode.py, kernels/decode_layers.cpp): the eager step's
greedy tokens for Llama-style models (Llama, Qwen2 with its q/k/v biases, Qwen2-VL's M-RoPE,
Qwen3-VL's q/k norms), alone and in ragged batches, with token merging and with KV policies that
read decode-time scores, and beyond the row kernel's rows on the matmul; the compiled step where it
does not apply (Gemma 3's layers)."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightvlm_core import cpu_attention, cpu_linear, decode_step
from lightvlm_core.compiled_decode import CompiledDecode
from lightvlm_core.engine import Engine
from lightvlm_core.fused_decode import FusedDecode, fused_weights
from lightvlm_core.runner import load_runner
from lightvlm_core.tiny import make_tiny
from lightvlm_core.types import GenerationRequest
from tests.core.ragged_batch import requests, tokens

pytestmark = pytest.mark.skipif(not cpu_attention.kernels_built(), reason="needs an AVX-512 CPU and g++")

# Llama; Qwen2 (q/k/v biases); Qwen2 with M-RoPE; Qwen3 (q/k norms) with interleaved M-RoPE
FAMILIES = ("llava", "llava_onevision", "qwen2_vl", "qwen3_vl")


def make_wide_heads(family: str, out_dir) -> str:
    """The tiny `family` model with 32-wide attention heads (the tiny models' are 16 wide; the
    decode attention kernel takes 32, 64 and 128)."""
    def widen(config) -> None:
        text = config.text_config
        if family == "qwen2_vl":  # its attention takes hidden_size / heads, whatever head_dim says
            text.hidden_size = config.vision_config.hidden_size = 4 * 32
            text.rope_parameters["mrope_section"] = [4, 6, 6]  # 16 rotary frequencies
        else:
            text.head_dim = 32
            if family == "qwen3_vl":
                text.rope_parameters["mrope_section"] = [4, 6, 6]

    return str(make_tiny(family, out_dir, configure=widen))


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory) -> tuple[Engine, Engine]:
    """(eager engine, fused engine) on one tiny model with 32-wide heads."""
    model = make_wide_heads(request.param, tmp_path_factory.mktemp(f"wide_{request.param}"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_attention, "decode_kernel_ready", lambda: True)
        fused = load_runner(model, device="cpu", compile=True)
    assert isinstance(fused.compiled_decode, FusedDecode)
    return Engine(load_runner(model, device="cpu")), Engine(fused)


def fused_step_rows(engine: Engine, batch: list[GenerationRequest]) -> tuple[list[list[int]], list[int]]:
    """The batch's tokens, and the row count of every step that ran the fused layers."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        got = tokens(engine, batch)
    return got, [e.input_shapes[0][0] for e in prof.events() if e.name == "lightvlm::decode_layers"]


@pytest.mark.parametrize("preset", ["none", "aggressive"])
def test_fused_engine_gives_the_eager_tokens_alone_and_in_a_ragged_batch(pair, preset) -> None:
    eager, fused = pair
    batch = requests(preset=preset)
    got, rows = fused_step_rows(fused, batch)
    assert got == tokens(eager, batch)
    assert rows == [3] * 7  # 8 tokens: the prefill's, then 7 steps
    for one in batch:
        assert tokens(fused, [one]) == tokens(eager, [one])


@pytest.mark.parametrize("threads", [1, 3])
def test_few_row_steps_give_the_same_tokens_on_any_number_of_threads(pair, threads) -> None:
    """Few-row steps run in one OpenMP region whose threads split the kernels' tasks: one thread,
    or more threads than some layers have tasks, give the tokens of the eager engine."""
    eager, fused = pair
    batch = requests(preset="aggressive")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got, rows = fused_step_rows(fused, batch)
    finally:
        torch.set_num_threads(before)
    assert rows == [3] * 7 and got == tokens(eager, batch)


def test_one_step_gives_the_eager_logits_and_cache(pair) -> None:
    """From one prefilled ragged batch: the fused step on one copy of its cache, the eager step on
    another; the same logits and the same new cache entries."""
    eager, _ = pair
    runner = eager.runner
    eager.add([eager.prepare(r) for r in requests()])
    try:
        inputs = [row.next_input() for row in runner.rows]
        ids, pos = torch.tensor([t for t, _ in inputs]), torch.tensor([p for _, p in inputs])
        pos = pos.expand(3, -1) if runner.adapter.uses_mrope else pos
        step = FusedDecode.of(runner.adapter, CompiledDecode(runner.adapter))
        assert step is not None
        rows = list(range(len(runner.rows)))
        cache_e, cache_f = runner.cache.copy_rows(rows), runner.cache.copy_rows(rows)
        expected = decode_step.decode(runner.adapter, cache_e, ids, pos)
        got = decode_step.decode(runner.adapter, cache_f, ids, pos, step)
    finally:
        runner.remove_all()
        eager.scheduler.running.clear()
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(cache_f.lengths, cache_e.lengths)
    for layer in range(len(cache_e.keys)):
        span = int(cache_e.lengths[layer].max())
        for fused, eager_buffer in ((cache_f.keys[layer], cache_e.keys[layer]),
                                    (cache_f.values[layer], cache_e.values[layer])):
            diff = (fused[:, :, :span] - eager_buffer[:, :, :span]).abs().max().item()
            assert diff < 1e-4, (layer, diff)


def test_kv_policies_give_the_eager_tokens(pair) -> None:
    """Streaming eviction, and heavy hitters (the step adds each row's attention to the cache's
    scores), alone and beside rows that do not score."""
    eager, fused = pair
    streaming = requests(n_tokens=12, kv={"kv_budget": 24, "kv_policy": "streaming"})
    assert tokens(fused, streaming) == tokens(eager, streaming)
    scored = requests(n_tokens=12, kv={"kv_budget": 24, "kv_policy": "heavy_hitter"})
    assert tokens(fused, scored) == tokens(eager, scored)
    mixed = scored[:2] + requests(n_tokens=12)[2:]
    assert tokens(fused, mixed) == tokens(eager, mixed)


@pytest.mark.parametrize("matmul", ["onednn packed", "onednn plain", "aten"])
def test_steps_of_more_rows_than_the_row_kernel_takes_run_fused_on_the_matmul(pair, matmul) -> None:
    """Beyond the row kernel's rows the op multiplies on oneDNN's matmul, by the weights packed for
    it where the prefill packed them (or by the plain ones, or on ATen's): the same tokens, and no
    compiled program."""
    eager, fused = pair
    step = fused.runner.compiled_decode
    packed = step._matmul_weights
    assert bool(packed) == cpu_linear.onednn_faster()
    assert all(w.layout == torch._mkldnn for w in packed)
    step._onednn, step._matmul_weights = matmul != "aten", packed if matmul == "onednn packed" else []
    try:
        batch = [r for _ in range(4) for r in requests(n_tokens=4)]  # 12 rows
        assert len(batch) > step.inner.few_rows
        got, rows = fused_step_rows(fused, batch)
    finally:
        step._onednn, step._matmul_weights = True, packed
    assert got == tokens(eager, batch)
    assert rows == [12] * 3
    assert step.inner._programs == {}


@pytest.mark.parametrize("family, applies", [("llava", True), ("llava_onevision", True), ("mistral3", True),
                                             ("qwen3_vl", True), ("gemma3", False)])
def test_which_models_it_takes(tiny_model_dir, monkeypatch, family, applies) -> None:
    """Llama-style layers (Qwen3's with their q/k norms) only: Gemma 3's sliding layers and own norms
    keep the compiled step (the tiny models' 16-wide heads admitted for the check)."""
    monkeypatch.setattr(cpu_attention, "HEAD_DIMS", (16, 32, 64, 128))
    runner = load_runner(str(tiny_model_dir(family)), device="cpu")
    assert (fused_weights(runner.adapter) is not None) == applies


def test_it_is_not_taken_for_weights_it_cannot_read_dense(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setattr(cpu_attention, "HEAD_DIMS", (16, 32, 64, 128))
    runner = load_runner(str(tiny_model_dir("llava")), device="cpu")
    assert fused_weights(runner.adapter) is not None
    layer = runner.adapter.layers[-1]
    layer.mlp.down_proj.weight = torch.nn.Parameter(layer.mlp.down_proj.weight.detach().t().contiguous().t())
    assert fused_weights(runner.adapter) is None


def test_it_is_not_taken_without_the_kernels_or_when_asked_not_to(tiny_model_dir, tmp_path, monkeypatch) -> None:
    model = make_wide_heads("llava", tmp_path)
    monkeypatch.setattr(cpu_attention, "decode_kernel_ready", lambda: True)
    assert isinstance(load_runner(model, device="cpu", compile=True, fused_decode=False).compiled_decode,
                      CompiledDecode)
    monkeypatch.setattr(cpu_attention, "decode_kernel_ready", lambda: False)
    assert isinstance(load_runner(model, device="cpu", compile=True).compiled_decode, CompiledDecode)
