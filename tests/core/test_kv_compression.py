"""Decode-time KV compression: parity when unlimited, budget, sinks/window, batching, memory."""

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


def test_unlimited_budget_is_exactly_uncompressed(engine):
    base = engine.generate([request(None)])[0]
    assert engine.generate([request(0)])[0].token_ids == base.token_ids
    assert engine.generate([request(100_000)])[0].token_ids == base.token_ids  # scores on, never evicts


def test_budget_holds_every_step_and_memory_goes_down(engine):
    budget = 64
    evicted_before = engine.evicted_tokens_total
    prepared = engine.prepare(request(budget))
    engine.add([prepared])
    peak = 0
    while engine.num_running:
        assert int(engine.cache.lengths.max()) <= max(budget, prepared.num_prompt_tokens)
        peak = max(peak, engine.kv_cache_tokens())
        engine.step()
        if engine.num_running:
            assert int(engine.cache.lengths.max()) <= budget  # compacted after the first step
    full = engine.generate([request(None)])[0]
    small = engine.generate([request(budget)])[0]
    layers = len(engine.adapter.layers)
    assert small.usage.kv_cache_bytes < full.usage.kv_cache_bytes
    assert engine.evicted_tokens_total > evicted_before
    assert full.usage.kv_cache_bytes == layers * (full.usage.prompt_tokens + 59) * engine.cache.bytes_per_entry()
    assert engine.kv_cache_bytes() == 0


def test_compressed_rows_in_a_batch_equal_rows_alone(engine):
    rows = [request(64, 40), request(None, 30, "What is it?"), request(80, 50, "Tell me more about it")]
    together = engine.generate(rows)
    alone = [engine.generate([r])[0] for r in rows]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


def test_compression_composes_with_merging(engine):
    req = GenerationRequest("Describe.", [image()], SamplingParams(max_new_tokens=40, ignore_eos=True),
                            AccelerationConfig(preset="balanced", kv_budget=64))
    result = engine.generate([req])[0]
    assert len(result.token_ids) == 40 and result.usage.image_tokens_kept < result.usage.image_tokens


def test_keep_indices_never_pick_padding_of_shorter_rows():
    scores = torch.rand(2, 3, 100)
    scores[0, :, 60:] = 1e6  # padding of row 0 (length 50): must never be kept
    keep = KVCompressor.keep_indices(scores, torch.tensor([50, 100]), 20, num_sinks=2, window=5)
    assert keep.shape == (2, 3, 20)
    assert int(keep[0].max()) < 50 and set(range(45, 50)) <= set(keep[0, 0].tolist())
    assert set(range(95, 100)) <= set(keep[1, 2].tolist()) and {0, 1} <= set(keep[1, 1].tolist())
