"""The model runner's row-level recovery and batch bookkeeping (tiny LLaVA, offline Engine)."""

from __future__ import annotations

import pytest
import torch

from lightvlm_core import decode_step
from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir("llava")), device="cpu")


def request(prompt: str, n: int, **accel) -> GenerationRequest:
    return GenerationRequest(prompt, sampling=SamplingParams(max_new_tokens=n, ignore_eos=True),
                             acceleration=AccelerationConfig(**accel) if accel else None)


def test_a_decode_failure_pinned_on_one_row_ends_only_that_row(engine, monkeypatch) -> None:
    short, long = request("hi", 12), request("tell me a long story " * 8, 12)
    alone = engine.generate([short])[0].token_ids
    threshold = engine.prepare(long).num_prompt_tokens + 2  # only the long row gets there
    real_decode = decode_step.decode

    def decode(adapter, cache, input_ids, pos, *compiled):
        if int(pos.max()) >= threshold:
            raise RuntimeError("this row's step breaks")
        return real_decode(adapter, cache, input_ids, pos, *compiled)

    monkeypatch.setattr(decode_step, "decode", decode)
    prepared = [engine.prepare(short), engine.prepare(long)]
    outputs = engine.add(prepared)
    tokens = {p.request_id: [o.token.token_id for o in outputs if o.request_id == p.request_id] for p in prepared}
    errors = []
    while engine.running:
        for o in engine.step():
            if o.error:
                errors.append((o.request_id, o.error))
                assert [r.request_id for r in engine.running] == [prepared[0].request_id]
            else:
                tokens[o.request_id].append(o.token.token_id)
    assert [(rid, e[0]) for rid, e in errors] == [(prepared[1].request_id, "internal_error")]
    assert "this row's step breaks" in errors[0][1][1]
    assert tokens[prepared[0].request_id] == alone  # the other row went on exactly as alone
    assert engine.kv_cache_bytes() == 0


def test_rows_leave_and_join_across_kv_budget_and_plain_rows(engine) -> None:
    """A budgeted row leaving turns decode scores off; rows joining later must not index stale
    per-row score flags (this raised IndexError in a busy batch)."""
    solo = {r.prompt: engine.generate([r])[0].token_ids for r in
            (request("long one", 30), request("two", 8), request("three", 9), request("four", 3, kv_budget=64))}
    a, b = engine.prepare(request("long one", 30)), engine.prepare(request("budget", 3, kv_budget=64))
    ids = {a.request_id: [], b.request_id: []}

    def take(outputs) -> None:
        for o in outputs:
            ids.setdefault(o.request_id, []).append(o.token.token_id)

    take(engine.add([a]))
    take(engine.step())
    take(engine.add([b]))
    for _ in range(4):
        take(engine.step())  # b has finished: scores are off again
    later = [engine.prepare(request(p, n)) for p, n in (("two", 8), ("three", 9))]
    take(engine.add(later))
    take(engine.add([budgeted := engine.prepare(request("four", 3, kv_budget=64))]))
    while engine.running:
        take(engine.step())
    assert ids[a.request_id] == solo["long one"]
    assert [ids[p.request_id] for p in later] == [solo["two"], solo["three"]]
    assert ids[budgeted.request_id] == solo["four"]
    assert engine.kv_cache_bytes() == 0 and torch.is_tensor(engine.cache.lengths)
