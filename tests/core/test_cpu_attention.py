"""The CPU attention kernels (lightvlm_core/cpu_attention.py, kernels/*.cpp): the prefill kernel
equal to SDPA on every shape it takes, causal and bidirectional, and used only for plain calls; the
decode kernel equal to the Python decode op (output, cache writes, lengths) on every layout; the
compiled passes of a model with 64-wide heads (LLM layers and vision tower) give the eager tokens
with both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.profiler import ProfilerActivity, profile

from lightvlm_core import compiled_prefill, cpu_attention
from lightvlm_core.bench.serve import DEMO_MODEL_DIR
from lightvlm_core.engine import Engine
from lightvlm_core.runner import load_runner
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

built = pytest.mark.skipif(not cpu_attention.kernels_built(), reason="needs an AVX-512 CPU and g++")


@built
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 2), (3, 3)])
def test_kernel_equals_sdpa(dim, heads, causal) -> None:
    gen = torch.Generator().manual_seed(dim)
    for batch in (1, 3):
        for tokens in (1, 7, 31, 32, 33, 100, 257):  # partial query blocks and key tiles
            q = torch.randn(batch, heads[0], tokens, dim, generator=gen)
            k, v = (torch.randn(batch, heads[1], tokens, dim, generator=gen) for _ in range(2))
            expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True, scale=0.3)
            got = torch.ops.lightvlm.prefill_attention(q, k, v, 0.3, causal)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@built
def test_peaked_scores_equal_sdpa() -> None:
    """Logits hundreds apart: the exp's range reduction and its clamp (weights below 2^-120 are
    dropped) give SDPA's probabilities, one-hot rows included."""
    gen = torch.Generator().manual_seed(1)
    q = 40 * torch.randn(2, 4, 70, 64, generator=gen)
    k, v = (torch.randn(2, 2, 70, 64, generator=gen) for _ in range(2))
    for causal in (True, False):
        expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        got = torch.ops.lightvlm.prefill_attention(q, k, v, 64 ** -0.5, causal)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@built
def test_non_contiguous_inputs_and_bad_shapes() -> None:
    q = torch.randn(2, 40, 4, 64).transpose(1, 2)  # (B, H, T, D) as a view of (B, T, H, D)
    k, v = (torch.randn(2, 40, 2, 64).transpose(1, 2) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(torch.ops.lightvlm.prefill_attention(q, k, v, 64 ** -0.5, True), expected,
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.lightvlm.prefill_attention(torch.randn(1, 2, 5, 48), torch.randn(1, 2, 5, 48),
                                             torch.randn(1, 2, 5, 48), 1.0, True)
    with pytest.raises(RuntimeError, match="float32"):
        x = torch.randn(1, 2, 5, 64, dtype=torch.float64)
        torch.ops.lightvlm.prefill_attention(x, x, x, 1.0, False)


def test_only_plain_calls_are_rerouted() -> None:
    q, k = torch.randn(1, 4, 9, 64), torch.randn(1, 2, 9, 64)
    plain = cpu_attention._plain_call
    assert plain(q, k, k, is_causal=True, enable_gqa=True)[3:] == (0.125, True)
    assert plain(q, k, k, enable_gqa=True, scale=0.5)[3:] == (0.5, False)  # bidirectional (vision towers)
    assert plain(q[:, :2], k, k, is_causal=True)
    assert plain(q, k, k, attn_mask=torch.ones(9, 9, dtype=torch.bool), enable_gqa=True) is None
    assert plain(q, k, k, is_causal=True) is None  # grouped heads without enable_gqa: SDPA's error
    assert plain(q, k, k, is_causal=True, enable_gqa=True, dropout_p=0.1) is None
    assert plain(q.double(), k.double(), k.double(), is_causal=True, enable_gqa=True) is None
    assert plain(q[..., :48], k[..., :48], k[..., :48], is_causal=True, enable_gqa=True) is None
    assert plain(q, k[:, :, :5], k[:, :, :5], is_causal=True, enable_gqa=True) is None  # a cache before the queries


@built
def test_the_mode_gives_sdpa_results() -> None:
    q, k, v = torch.randn(1, 4, 30, 64), torch.randn(1, 2, 30, 64), torch.randn(1, 2, 30, 64)
    mask = torch.rand(30, 30) > 0.3
    with cpu_attention.PrefillAttention():
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        bidirectional = F.scaled_dot_product_attention(q, k, v, None, 0.0, False, scale=0.2, enable_gqa=True)
        masked = F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(bidirectional, F.scaled_dot_product_attention(q, k, v, scale=0.2, enable_gqa=True),
                               atol=1e-5, rtol=1e-4)
    assert torch.equal(masked, F.scaled_dot_product_attention(q, k, v, mask, enable_gqa=True))


@built
def test_the_kernels_run_their_loops_on_openmp_threads() -> None:
    """at::parallel_for is a header template: without OpenMP in the extension's own build its loops
    run on one thread (as they did until 2026-12-04). The library must call OpenMP's fork."""
    maps = Path("/proc/self/maps").read_text()
    library = next(line.split()[-1] for line in maps.splitlines() if line.endswith("lightvlm_cpu_kernels.so"))
    assert b"GOMP_parallel" in Path(library).read_bytes()


def test_the_setting_turns_it_off(monkeypatch) -> None:
    cpu_attention.prefill_kernel_ready.cache_clear()
    cpu_attention.decode_kernel_ready.cache_clear()
    monkeypatch.setenv("LIGHTVLM_ATTENTION_KERNEL", "0")
    try:
        assert cpu_attention.prefill_kernel_ready() is False
        assert cpu_attention.decode_kernel_ready() is False
    finally:
        cpu_attention.prefill_kernel_ready.cache_clear()
        cpu_attention.decode_kernel_ready.cache_clear()


@built
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 2), (16, 2), (6, 2), (14, 2), (20, 2), (24, 1)])
def test_decode_kernel_equals_the_python_op(dim, heads) -> None:
    """Alone and in ragged batches, short and long rows, with and without heavy-hitter scores."""
    for batch, entries in ((1, 1), (1, 17), (3, 16), (3, 100), (8, 600), (2, 2100)):
        for scoring in (False, True):  # with scores: heavy-hitter statistics for the scoring rows
            python = cpu_attention.decode_step_inputs(entries, *heads, dim, batch, seed=entries, scoring=scoring)
            kernel = cpu_attention.decode_step_inputs(entries, *heads, dim, batch, seed=entries, scoring=scoring)
            expected = torch.ops.lightvlm.decode_attention(*python)
            got = torch.ops.lightvlm.cpu_decode_attention(*kernel)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
            for name, a, b in zip(("keys", "values", "lengths"), python[3:6], kernel[3:6]):
                assert torch.equal(a, b), name
            torch.testing.assert_close(kernel[9], python[9], atol=1e-6, rtol=1e-5)


@built
def test_decode_kernel_refuses_what_it_does_not_take() -> None:
    args = cpu_attention.decode_step_inputs(10)
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.lightvlm.cpu_decode_attention(args[0].double(), *args[1:])
    full = cpu_attention.decode_step_inputs(10)
    full[5] += full[3].shape[2] - 10  # every slot taken
    with pytest.raises(RuntimeError, match="no room"):
        torch.ops.lightvlm.cpu_decode_attention(*full)
    narrow = cpu_attention.decode_step_inputs(10, dim=48)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.lightvlm.cpu_decode_attention(*narrow)


@built
def test_compiled_passes_of_the_demo_model_use_the_kernels_and_give_the_eager_tokens(monkeypatch) -> None:
    """The bundled model's heads are 64 wide (the tiny test models' are not, so their compiled
    decode step keeps the Python op: checked here too)."""
    monkeypatch.setattr(compiled_prefill, "prefill_kernel_ready", lambda: True)
    monkeypatch.setattr(cpu_attention, "decode_kernel_ready", lambda: True)
    compiled = Engine(load_runner(str(DEMO_MODEL_DIR), device="cpu", compile=True, fused_decode=False))
    eager = Engine(load_runner(str(DEMO_MODEL_DIR), device="cpu"))
    assert compiled.runner.compiled_decode.attention == "cpu_decode_attention"
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    batch = [GenerationRequest("What shape is in the image?", [Image.new("RGB", (224, 224), (200, 40, 40))],
                               sampling, AccelerationConfig(preset))
             for preset in ("none", "aggressive")] + [GenerationRequest("Describe.", [], sampling)]
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        got = [r.token_ids for r in compiled.generate(batch)]
    names = {e.name for e in prof.events()}
    assert "lightvlm::cpu_decode_attention" in names
    prefill_heads = {e.input_shapes[0][1] for e in prof.events()  # (compiling's traced calls have no shapes)
                     if e.name == "lightvlm::prefill_attention" and e.input_shapes and e.input_shapes[0]}
    assert prefill_heads == {3, 4}  # the vision tower's 3 heads (bidirectional) and the LLM's 4 (causal)
    assert "lightvlm::decode_attention" not in names
    assert got == [r.token_ids for r in eager.generate(batch)]


def test_the_decode_kernel_is_not_taken_for_heads_it_does_not_handle(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setattr(cpu_attention, "decode_kernel_ready", lambda: True)
    runner = load_runner(str(tiny_model_dir("llava")), device="cpu", compile=True)  # head_dim 16
    assert runner.compiled_decode.attention == "decode_attention"
