"""The CPU attention kernels (lightvlm_core/cpu_attention.py, kernels/*.cpp): the causal prefill kernel
equal to SDPA on every shape it takes and used only for plain causal calls; the decode kernel equal
to the Python decode op (output, cache writes, lengths) on every layout; the compiled passes of a
model with 64-wide heads give the eager tokens with both."""

from __future__ import annotations

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
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 2)])
def test_kernel_equals_sdpa(dim, heads) -> None:
    gen = torch.Generator().manual_seed(dim)
    for batch in (1, 3):
        for tokens in (1, 7, 31, 32, 33, 100, 257):  # partial query blocks and key tiles
            q = torch.randn(batch, heads[0], tokens, dim, generator=gen)
            k, v = (torch.randn(batch, heads[1], tokens, dim, generator=gen) for _ in range(2))
            expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, scale=0.3)
            got = torch.ops.lightvlm.causal_attention(q, k, v, 0.3)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


@built
def test_non_contiguous_inputs_and_bad_shapes() -> None:
    q = torch.randn(2, 40, 4, 64).transpose(1, 2)  # (B, H, T, D) as a view of (B, T, H, D)
    k, v = (torch.randn(2, 40, 2, 64).transpose(1, 2) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(torch.ops.lightvlm.causal_attention(q, k, v, 64 ** -0.5), expected,
                               atol=1e-5, rtol=1e-4)
    with pytest.raises(RuntimeError, match="head_dim"):
        torch.ops.lightvlm.causal_attention(torch.randn(1, 2, 5, 48), torch.randn(1, 2, 5, 48),
                                            torch.randn(1, 2, 5, 48), 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        x = torch.randn(1, 2, 5, 64, dtype=torch.float64)
        torch.ops.lightvlm.causal_attention(x, x, x, 1.0)


def test_only_plain_causal_calls_are_rerouted() -> None:
    q, k = torch.randn(1, 4, 9, 64), torch.randn(1, 2, 9, 64)
    plain = cpu_attention._plain_causal
    assert plain(q, k, k, is_causal=True, enable_gqa=True)
    assert plain(q[:, :2], k, k, is_causal=True)
    assert not plain(q, k, k, is_causal=False, enable_gqa=True)  # bidirectional (vision towers)
    assert not plain(q, k, k, attn_mask=torch.ones(9, 9, dtype=torch.bool), enable_gqa=True)
    assert not plain(q, k, k, is_causal=True)  # grouped heads without enable_gqa: SDPA's error
    assert not plain(q, k, k, is_causal=True, enable_gqa=True, dropout_p=0.1)
    assert not plain(q.double(), k.double(), k.double(), is_causal=True, enable_gqa=True)
    assert not plain(q[..., :48], k[..., :48], k[..., :48], is_causal=True, enable_gqa=True)
    assert not plain(q, k[:, :, :5], k[:, :, :5], is_causal=True, enable_gqa=True)  # a cache before the queries


@built
def test_the_mode_gives_sdpa_results_either_way() -> None:
    q, k, v = torch.randn(1, 4, 30, 64), torch.randn(1, 2, 30, 64), torch.randn(1, 2, 30, 64)
    with cpu_attention.CausalAttention():
        causal = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        bidirectional = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    torch.testing.assert_close(causal, F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                               atol=1e-5, rtol=1e-4)
    assert torch.equal(bidirectional, F.scaled_dot_product_attention(q, k, v, enable_gqa=True))


def test_the_setting_turns_it_off(monkeypatch) -> None:
    cpu_attention.causal_kernel_ready.cache_clear()
    cpu_attention.decode_kernel_ready.cache_clear()
    monkeypatch.setenv("LIGHTVLM_ATTENTION_KERNEL", "0")
    try:
        assert cpu_attention.causal_kernel_ready() is False
        assert cpu_attention.decode_kernel_ready() is False
    finally:
        cpu_attention.causal_kernel_ready.cache_clear()
        cpu_attention.decode_kernel_ready.cache_clear()


@built
@pytest.mark.parametrize("dim", [32, 64, 128])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (8, 2), (16, 2)])
def test_decode_kernel_equals_the_python_op(dim, heads) -> None:
    """Alone and in ragged batches, short and long rows: with more than two query heads per KV head
    long steps take the kernel's SDPA branch (kLargeStep), the others its own loops."""
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
    monkeypatch.setattr(compiled_prefill, "causal_kernel_ready", lambda: True)
    monkeypatch.setattr(cpu_attention, "decode_kernel_ready", lambda: True)
    compiled = Engine(load_runner(str(DEMO_MODEL_DIR), device="cpu", compile=True))
    eager = Engine(load_runner(str(DEMO_MODEL_DIR), device="cpu"))
    assert compiled.runner.compiled_decode.attention == "cpu_decode_attention"
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    batch = [GenerationRequest("What shape is in the image?", [Image.new("RGB", (224, 224), (200, 40, 40))],
                               sampling, AccelerationConfig(preset))
             for preset in ("none", "aggressive")] + [GenerationRequest("Describe.", [], sampling)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = [r.token_ids for r in compiled.generate(batch)]
    names = {e.name for e in prof.events()}
    assert {"lightvlm::causal_attention", "lightvlm::cpu_decode_attention"} <= names
    assert "lightvlm::decode_attention" not in names
    assert got == [r.token_ids for r in eager.generate(batch)]


def test_the_decode_kernel_is_not_taken_for_heads_it_does_not_handle(tiny_model_dir, monkeypatch) -> None:
    monkeypatch.setattr(cpu_attention, "decode_kernel_ready", lambda: True)
    runner = load_runner(str(tiny_model_dir("llava")), device="cpu", compile=True)  # head_dim 16
    assert runner.compiled_decode.attention == "decode_attention"
