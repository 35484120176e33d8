"""The causal prefill attention kernel (lightvlm_core/cpu_attention.py, kernels/causal_attention.cpp):
equal to SDPA on every shape it takes, used only for plain causal calls, and the compiled prefill of
a model with 64-wide heads gives the eager tokens with it."""

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

built = pytest.mark.skipif(not cpu_attention.causal_kernel_built(), reason="needs an AVX-512 CPU and g++")


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
    monkeypatch.setenv("LIGHTVLM_ATTENTION_KERNEL", "0")
    try:
        assert cpu_attention.causal_kernel_ready() is False
    finally:
        cpu_attention.causal_kernel_ready.cache_clear()


@built
def test_compiled_prefill_of_the_demo_model_uses_it_and_gives_the_eager_tokens(monkeypatch) -> None:
    """The bundled model's heads are 64 wide (the tiny test models' are not)."""
    monkeypatch.setattr(compiled_prefill, "causal_kernel_ready", lambda: True)
    compiled = Engine(load_runner(str(DEMO_MODEL_DIR), device="cpu", compile=True))
    eager = Engine(load_runner(str(DEMO_MODEL_DIR), device="cpu"))
    sampling = SamplingParams(max_new_tokens=6, ignore_eos=True)
    batch = [GenerationRequest("What shape is in the image?", [Image.new("RGB", (224, 224), (200, 40, 40))],
                               sampling, AccelerationConfig(preset))
             for preset in ("none", "aggressive")] + [GenerationRequest("Describe.", [], sampling)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        got = [r.token_ids for r in compiled.generate(batch)]
    assert any(e.name == "lightvlm::causal_attention" for e in prof.events())
    assert got == [r.token_ids for r in eager.generate(batch)]
