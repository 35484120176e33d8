"""Every KV policy of the registry on every tiny family: an unreachable budget is exactly no
budget, per-layer budgets hold at every decode step, batched rows (mixed policies) equal rows
alone, and no policy computes scores it does not read."""

from __future__ import annotations

import pytest

from lightvlm_core.kv.registry import kv_policy, kv_policy_names
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams
from tests.core.methods.conftest import PROMPTS

POLICIES = kv_policy_names()


def request(budget: int | None, policy: str | None, n: int = 24, prompt: int = 2) -> GenerationRequest:
    text, images = PROMPTS[prompt]
    return GenerationRequest(text, images, SamplingParams(max_new_tokens=n, ignore_eos=True),
                             AccelerationConfig(kv_budget=budget, kv_policy=policy))


@pytest.mark.parametrize("policy", POLICIES)
def test_unreachable_budget_is_exactly_no_budget(engine, policy):
    base = engine.generate([request(None, None)])[0]
    evicted = engine.compressor.evicted_total
    assert engine.generate([request(engine.max_context, policy)])[0].token_ids == base.token_ids
    assert engine.compressor.evicted_total == evicted


@pytest.mark.parametrize("policy", POLICIES)
def test_per_layer_budgets_hold_at_every_step(engine, policy):
    budget = 32
    limits = [kv_policy(policy).layer_budget(budget, layer, len(engine.adapter.layers))
              for layer in range(len(engine.adapter.layers))]
    evicted = engine.compressor.evicted_total
    engine.add([engine.prepare(request(budget, policy, n=24))])
    steps = 0
    while engine.num_running:
        engine.step()
        steps += 1
        if engine.num_running:
            held = engine.cache.lengths[:, 0].tolist()  # entries of the one row, per layer
            assert all(n <= cap for n, cap in zip(held, limits)), (steps, held, limits)
    assert steps == 23 and engine.compressor.evicted_total > evicted


@pytest.mark.parametrize("policy", POLICIES)
def test_batched_rows_with_mixed_policies_equal_rows_alone(engine, policy):
    other = POLICIES[(POLICIES.index(policy) + 1) % len(POLICIES)]
    rows = [request(32, policy, 20, 0), request(None, None, 12, 1), request(48, other, 16, 2),
            request(32, policy, 18, 2)]
    together = engine.generate(rows)
    alone = [engine.generate([r])[0] for r in rows]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]


@pytest.mark.parametrize("policy", POLICIES)
def test_scores_only_where_the_policy_reads_them(engine, policy):
    engine.add([engine.prepare(request(32, policy, n=4))])
    spec = kv_policy(policy)
    assert (engine.cache.scores is not None) == spec.needs_prefill_scores
    assert bool(engine.cache.decode_scored_rows().any()) == spec.needs_decode_scores
    while engine.num_running:
        engine.step()
