"""Batched sampling (lightvlm_core/sampling.py): the right distribution, and a seeded row samples the
same tokens alone or in any batch."""

from __future__ import annotations

import math

import pytest
import torch

from lightvlm_core import sampling
from lightvlm_core.sampling import make_generator, sample
from lightvlm_core.types import SamplingParams

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])


def expected(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The target distribution, written out plainly: softmax(l / T), top-k, renormalise, top-p."""
    probs = (logits / temperature).softmax(-1)
    order = probs.argsort(descending=True)
    kept = order[:top_k] if top_k else order
    probs = torch.zeros_like(probs).scatter(0, kept, probs[kept])
    probs = probs / probs.sum()
    mass, nucleus = 0.0, []
    for token in order.tolist():
        if probs[token] == 0 or (nucleus and mass >= top_p):
            break
        nucleus.append(token)
        mass += float(probs[token])
    out = torch.zeros_like(probs)
    out[nucleus] = probs[nucleus]
    return out / out.sum()


def draws(params: SamplingParams, rows: int, rounds: int) -> torch.Tensor:
    """Token counts over rows x rounds draws, one generator per row (seeds 0..rows-1)."""
    plist = [SamplingParams(**{**params.__dict__, "seed": s}) for s in range(rows)]
    gens = [make_generator(p, torch.device("cpu")) for p in plist]
    counts = torch.zeros(LOGITS.shape[0])
    for _ in range(rounds):
        for token in sample(LOGITS.expand(rows, -1).clone(), plist, gens):
            counts[token] += 1
    return counts


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 4, 1.0),
                                                     (1.0, 0, 0.8), (0.8, 5, 0.9)])
@pytest.mark.parametrize("candidates", [1024, 2, 4])  # 2 and 4 also run top-p's fallback to a full sort
def test_frequencies_follow_the_distribution(temperature, top_k, top_p, candidates, monkeypatch):
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", candidates)
    n = 20_000
    counts = draws(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), rows=2000, rounds=10)
    target = expected(LOGITS, temperature, top_k, top_p)
    assert counts[target == 0].sum() == 0  # masked tokens are never drawn
    for token, p in enumerate(target.tolist()):
        if p > 0:  # within 5 standard deviations of the binomial count
            assert abs(counts[token] - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1, (token, counts.tolist(), p)


def test_seeded_row_is_the_same_alone_and_in_any_batch():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.9, seed=11), SamplingParams(), SamplingParams(temperature=1.2, top_k=7, seed=3),
              SamplingParams(temperature=0.6, top_p=0.7, seed=5), SamplingParams(temperature=1.0, seed=11)]

    def run(rows: list[int], steps: int = 6) -> list[list[int]]:
        gens = [make_generator(params[r], torch.device("cpu")) for r in rows]
        return [sample(logits[rows], [params[r] for r in rows], gens) for _ in range(steps)]

    batched = run([0, 1, 2, 3, 4])
    for i in range(5):
        assert [step[i] for step in batched] == [step[0] for step in run([i])]
    assert [step[1] for step in batched] == [int(logits[1].argmax())] * 6  # the greedy row
    reordered = run([3, 0])
    assert [step[0] for step in reordered] == [step[3] for step in batched]


def test_top_k_one_and_vanishing_top_p_keep_the_argmax():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    params = [SamplingParams(temperature=1.0, top_p=5e-324, seed=s) for s in range(4)]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    for _ in range(5):
        assert sample(logits, params, gens) == logits.argmax(-1).tolist()


def test_different_seeds_draw_different_sequences():
    logits = torch.zeros(1, 1000)  # uniform: two seeds agreeing on 8 draws would be a broken generator
    seqs = []
    for seed in (1, 2):
        p = SamplingParams(temperature=1.0, seed=seed)
        gen = make_generator(p, torch.device("cpu"))
        seqs.append([sample(logits, [p], [gen])[0] for _ in range(8)])
    assert seqs[0] != seqs[1]


def test_a_uniform_at_the_top_still_picks_a_token_with_mass(monkeypatch):
    """u * total can round up to the total: at that boundary (u = 1 here) the draw must still land on
    a kept token, not past the vocabulary or on a masked one."""
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.ones(1, dtype=k.get("dtype")))
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.1, -2.0]] * 3)
    params = [SamplingParams(temperature=1.0, top_k=k, seed=0) for k in (0, 2, 4)]
    gens = [make_generator(p, torch.device("cpu")) for p in params]
    assert sample(logits, params, gens) == [5, 1, 3]  # the last token each row keeps


def test_non_finite_logits_fail_instead_of_drawing_an_arbitrary_token():
    logits = torch.tensor([[1.0, float("nan"), 0.5]])
    p = SamplingParams(temperature=1.0, seed=0)
    with pytest.raises(ValueError, match="not finite"):
        sample(logits, [p], [make_generator(p, torch.device("cpu"))])
