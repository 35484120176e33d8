"""The decode step's per-step preparation: rotary tables built once per kind, every layer's key
mask built once, and the mask left out where rows are of equal length; all bitwise neutral."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from lightvlm_core import decode_step, forward
from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.forward import RopeTables
from lightvlm_core.kv.cache import BatchedKVCache
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import GenerationRequest, SamplingParams


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_tables_are_bitwise_transformers_rotary(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 7, 16).to(dtype), torch.randn(2, 2, 7, 16).to(dtype)
    cos, sin = torch.randn(2, 7, 16).to(dtype), torch.randn(2, 7, 16).to(dtype)
    q_hf, k_hf = apply_rotary_pos_emb(q, k, cos, sin)
    rope = RopeTables.build(cos, sin)
    assert torch.equal(rope.apply(q), q_hf)
    assert torch.equal(rope.apply(k), k_hf)


def test_reserve_builds_every_layers_mask_and_knows_which_layers_are_ragged() -> None:
    lengths = torch.tensor([[3, 3], [2, 4], [0, 1]])  # (L, B): layer 0 even, layers 1 and 2 ragged
    blank = [torch.zeros(2, 1, 6, 4) for _ in range(3)]
    cache = BatchedKVCache([b.clone() for b in blank], [b.clone() for b in blank], lengths.clone())
    cache.reserve(1)
    assert [cache.ragged(layer) for layer in range(3)] == [False, True, True]
    new = torch.ones(2, 1, 4)
    for layer in range(3):
        keys, _, mask = cache.append(layer, new * (layer + 1), new)
        after = lengths[layer] + 1
        assert mask.shape == (2, int(after.max()))
        assert torch.equal(mask, torch.arange(mask.shape[1])[None] < after[:, None])
        for row in range(2):  # the new entry sits right after the row's old entries
            assert torch.equal(keys[row, 0, int(lengths[layer, row])], new[row, 0] * (layer + 1))
    assert torch.equal(cache.lengths, lengths + 1)


def test_step_masks_are_built_once_from_the_lengths_before_the_steps_appends() -> None:
    """The masks are built where a step first reads them (the fused step never does): by the
    compiled step before the appends, else by the first append, from the lengths before it."""
    lengths = torch.tensor([[3, 1], [2, 4]])
    blank = [torch.zeros(2, 1, 6, 4) for _ in range(2)]
    cache = BatchedKVCache([b.clone() for b in blank], [b.clone() for b in blank], lengths.clone())
    cache.reserve(1)
    masks = cache.step_masks()
    assert torch.equal(masks, torch.arange(5)[None, None] < (lengths + 1)[:, :, None])
    new = torch.ones(2, 1, 4)
    _, _, mask = cache.append(0, new, new)
    assert cache.step_masks() is masks and torch.equal(mask, masks[0, :, :4])
    cache.reserve(1)  # the next step: the first append builds them, from the lengths before it
    before = cache.lengths.clone()  # [[4, 2], [2, 4]]: only layer 0 appended in the last step
    _, _, mask = cache.append(1, new, new)
    expected = torch.arange(5)[None, None] < (before + 1)[:, :, None]
    assert torch.equal(cache.step_masks(), expected) and torch.equal(mask, expected[1])


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir(request.param)), device="cpu")


def test_rows_of_equal_length_decode_without_the_mask_bitwise_as_with_it(engine, monkeypatch) -> None:
    """Two identical prompts fill every layer's span: leaving the all-True mask out changes nothing."""
    if any(spec.attention == "sliding" for spec in engine.adapter.layer_specs):
        pytest.skip("sliding layers always take their window mask")
    requests = [GenerationRequest("Tell me a story.", [], SamplingParams(max_new_tokens=4, ignore_eos=True))
                for _ in range(2)]
    engine.add([engine.prepare(request) for request in requests])
    try:
        cache = engine.runner.cache
        ids, pos = torch.tensor([5, 5]), torch.tensor([40, 40])
        if engine.adapter.uses_mrope:
            pos = pos.expand(3, -1)
        masked_cache = cache.copy_rows([0, 1])
        plain = decode_step.decode(engine.adapter, cache, ids, pos)
        assert not any(cache.ragged(layer) for layer in range(cache.num_layers))
        calls = []
        sdpa = forward.F.scaled_dot_product_attention

        def spy(*args, attn_mask=None, **kw):
            calls.append(attn_mask)
            return sdpa(*args, attn_mask=attn_mask, **kw)

        monkeypatch.setattr(forward.F, "scaled_dot_product_attention", spy)
        monkeypatch.setattr(BatchedKVCache, "ragged", lambda self, layer: True)
        masked = decode_step.decode(engine.adapter, masked_cache, ids, pos)
        assert calls and all(m is not None for m in calls)
        assert torch.equal(plain, masked)
    finally:
        engine.runner.remove_all()
        engine.scheduler.running.clear()
