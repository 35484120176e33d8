"""Every reduction method of the registry (and a test-registered example) on every tiny family:
keep 1.0 is exactly `none`, batched rows equal rows alone, kept counts are exact per image, and
the prefill cost the scheduler counts beforehand is what the prefill then ran."""

from __future__ import annotations

import pytest

from lightvlm_core.reduction.base import span_target
from lightvlm_core.reduction.registry import method_names
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams
from tests.core.methods.conftest import PROMPTS

METHODS = [*method_names(), "keep_first"]


# Keyed by the engine object itself (not id(): a module-scoped engine that is freed can hand its id
# to the next family's engine, which then met the previous family's tokens: a flaky failure).
_NONE: dict[object, list[list[int]]] = {}


def requests(accel: AccelerationConfig, n: int = 3) -> list[GenerationRequest]:
    return [GenerationRequest(p, imgs, SamplingParams(max_new_tokens=n, ignore_eos=True), accel) for p, imgs in PROMPTS]


@pytest.mark.parametrize("method", METHODS)
def test_keep_one_is_exactly_none(engine, method):
    if engine not in _NONE:
        _NONE[engine] = [r.token_ids for r in engine.generate(requests(AccelerationConfig("none")))]
    full = engine.generate(requests(AccelerationConfig(method, keep_ratio=1.0)))
    assert [r.token_ids for r in full] == _NONE[engine]
    assert all(r.usage.image_tokens_kept == r.usage.image_tokens for r in full)


@pytest.mark.parametrize("method", METHODS)
def test_batched_rows_equal_rows_alone_with_exact_counts(engine, method):
    keep = 0.25
    batch = requests(AccelerationConfig(method, keep_ratio=keep))
    together = engine.generate(batch)
    alone = [engine.generate([r])[0] for r in batch]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    for request, result in zip(batch, together):
        spans = engine.adapter.image_spans(engine.prepare(request).prompt.input_ids)
        assert len(spans) >= len(request.images)  # one span per image (or per tile group)
        assert result.usage.image_tokens == sum(e - s for s, e in spans)
        assert result.usage.image_tokens_kept == sum(span_target(keep, e - s) for s, e in spans)
        assert 0 < result.usage.image_kept_fraction_layer_avg < 1


@pytest.mark.parametrize("preset", ["none", "aggressive", *METHODS])
def test_prefill_cost_is_the_tokens_each_layer_then_ran(engine, preset):
    """`Request.prefill_cost` (reduction/cost.py), known before the prefill, equals the text plus
    kept image tokens the prefill ran, summed over the LLM's layers / layers, rounded up."""
    layers = len(engine.adapter.layers)
    for request in requests(AccelerationConfig(preset), n=1):
        cost = engine.prepare(request).prefill_cost
        usage = engine.generate([request])[0].usage
        text = usage.prompt_tokens - usage.image_tokens
        kept = round(usage.image_kept_fraction_layer_avg * layers * usage.image_tokens)  # summed over layers
        assert cost == -(-(text * layers + kept) // layers)
        assert (cost < usage.prompt_tokens) == (preset != "none" and usage.image_tokens > 0)
