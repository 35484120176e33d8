"""Decode-time KV compression: sinks/window selection, memory, composition with merging (the policy
matrix in tests/core/methods/test_kv_matrix.py covers parity, budgets and batching)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.kv.compress import KVCompressor
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


def test_keep_indices_always_hold_sinks_and_recent_window():
    scores = torch.zeros(2, 100)
    scores[:, 40:58] = 10.0  # heavy hitters in the middle
    scores[:, 58:70] = 5.0  # runners-up, evicted
    scores[1, 92:] = 100.0  # inside the window anyway
    keep = KVCompressor.keep_indices(scores[None], torch.tensor([100]), 30, num_sinks=4, window=8)[0]
    for head in keep.tolist():
        assert head == sorted(head) and len(set(head)) == 30
        assert set(range(4)) <= set(head) and set(range(92, 100)) <= set(head)
        assert set(head) - set(range(4)) - set(range(92, 100)) == set(range(40, 58))  # top-18 heavy


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir(request.param)), device="cpu")


def image():
    img = Image.new("RGB", (160, 120), (240, 240, 240))
    img.paste((200, 30, 30), (20, 20, 80, 70))
    return img


def request(budget, n=60, prompt="Describe the image in detail."):
    return GenerationRequest(prompt, [image()], SamplingParams(max_new_tokens=n, ignore_eos=True),
                             AccelerationConfig(kv_budget=budget))


def test_memory_goes_down_and_is_released(engine):
    budget = 64
    evicted_before = engine.compressor.evicted_total
    full = engine.generate([request(None)])[0]
    small = engine.generate([request(budget)])[0]
    layers = len(engine.adapter.layers)
    assert small.usage.kv_cache_bytes < full.usage.kv_cache_bytes
    assert engine.compressor.evicted_total > evicted_before
    assert full.usage.kv_cache_bytes == layers * (full.usage.prompt_tokens + 59) * engine.cache.bytes_per_entry()
    assert engine.kv_cache_bytes() == 0


def test_compression_composes_with_merging(engine):
    req = GenerationRequest("Describe.", [image()], SamplingParams(max_new_tokens=40, ignore_eos=True),
                            AccelerationConfig(preset="balanced", kv_budget=64))
    result = engine.generate([req])[0]
    assert len(result.token_ids) == 40 and result.usage.image_tokens_kept < result.usage.image_tokens


def test_pyramidkv_budgets_shrink_with_depth_and_average_the_budget():
    from lightvlm_core.kv.registry import kv_policy

    budgets = [kv_policy("pyramidkv").layer_budget(128, layer, 32) for layer in range(32)]
    assert budgets == sorted(budgets, reverse=True) and budgets[-1] == 8 and abs(sum(budgets) / 32 - 128) < 1
    assert [kv_policy("snapkv").layer_budget(128, layer, 32) for layer in (0, 31)] == [128, 128]


def test_streaming_keeps_sinks_and_the_most_recent_entries():
    from lightvlm_core.kv.registry import kv_policy

    scores = torch.rand(1, 2, 100)  # ignored
    keep = kv_policy("streaming").keep_indices(scores, torch.tensor([100]), 30, num_sinks=4, window=8)
    assert keep[0, 0].tolist() == [0, 1, 2, 3, *range(74, 100)]


def test_keep_indices_never_pick_padding_of_shorter_rows():
    scores = torch.rand(2, 3, 100)
    scores[0, :, 60:] = 1e6  # padding of row 0 (length 50): must never be kept
    keep = KVCompressor.keep_indices(scores, torch.tensor([50, 100]), 20, num_sinks=2, window=5)
    assert keep.shape == (2, 3, 20)
    assert int(keep[0].max()) < 50 and set(range(45, 50)) <= set(keep[0, 0].tolist())
    assert set(range(95, 100)) <= set(keep[1, 2].tolist()) and {0, 1} <= set(keep[1, 1].tolist())
