"""Layer-sliced prefill on the real model runner: a prefill over the step's token budget runs a
few layers per step between the running rows' decode steps, and gives exactly the tokens (and
the KV cache) of an unsliced prefill, with token merging on or off, for every family."""

from __future__ import annotations

import time

import pytest
import torch
from PIL import Image

from lightvlm_core import forward
from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.request import Request
from lightvlm_core.runner import ModelRunner
from lightvlm_core.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir(request.param)), device="cpu")


def image() -> Image.Image:
    img = Image.new("RGB", (160, 120), (240, 240, 240))
    img.paste((200, 30, 30), (20, 20, 80, 70))
    return img


def long_request(preset: str = "none", tokens: int = 8, prompt: str = "Describe the image in detail.") -> GenerationRequest:
    return GenerationRequest(prompt, [image()], SamplingParams(max_new_tokens=tokens, ignore_eos=True),
                             AccelerationConfig(preset))


def short_request(tokens: int = 40) -> GenerationRequest:
    return GenerationRequest("Tell me a story.", [], SamplingParams(max_new_tokens=tokens, ignore_eos=True))


class AdvanceSpy:
    """Counts PrefillRun.advance calls (one per prefill group and step)."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[tuple[int, int | None]] = []
        real = forward.PrefillRun.advance

        def advance(run, until=None):
            self.calls.append((run.next_layer, until))
            return real(run, until)

        monkeypatch.setattr(forward.PrefillRun, "advance", advance)


def alone(engine: Engine, request: GenerationRequest) -> list[int]:
    return engine.generate([request])[0].token_ids


def run_to_end(engine: Engine, request: GenerationRequest) -> tuple[list[torch.Tensor], list[int]]:
    """The KV cache right after the prefill (lengths, then each layer's keys and values) and the tokens."""
    outputs = engine.add([engine.prepare(request)])
    cache = engine.runner.cache
    snapshot = [cache.lengths.clone(), *[t.clone() for t in cache.keys + cache.values]]
    tokens = [o.token.token_id for o in outputs if o.token]
    while engine.num_running:
        tokens += [o.token.token_id for o in engine.step() if o.token]
    return snapshot, tokens


@pytest.mark.parametrize("preset", ["none", "aggressive"])
def test_a_sliced_prefill_gives_the_tokens_and_cache_of_an_unsliced_one(engine, monkeypatch, preset) -> None:
    whole = Engine(engine.runner.loaded)
    request = long_request(preset)
    cost = whole.prepare(request).prefill_cost
    layers = len(engine.adapter.layers)
    # a budget of a third of the prefill's cost: 2 of the 6 layers per step
    sliced = Engine(engine.runner.loaded, SchedulerConfig(max_num_batched_tokens=cost // 3 + 1))
    cache_whole, tokens_whole = run_to_end(whole, request)
    spy = AdvanceSpy(monkeypatch)
    cache_sliced, tokens_sliced = run_to_end(sliced, request)
    assert spy.calls == [(0, layers // 3), (layers // 3, 2 * layers // 3), (2 * layers // 3, None)]  # sliced
    assert all(torch.equal(a, b) for a, b in zip(cache_whole, cache_sliced, strict=True))
    assert tokens_sliced == tokens_whole and len(tokens_whole) == request.sampling.max_new_tokens


def drive(runner: ModelRunner, scheduler: Scheduler, tokens: dict[str, list[int]]) -> tuple:
    """One engine step (as the EngineCore runs it); records every sampled token."""
    scheduled = scheduler.schedule(time.monotonic())
    output = runner.execute(scheduled)
    for update in scheduler.update_from_output(scheduled, output, time.monotonic()):
        tokens.setdefault(update.request.request_id, []).extend(update.new_token_ids)
    runner.remove(scheduler.pop_finished_ids())
    return scheduled, output


def test_running_rows_decode_in_every_step_of_a_sliced_prefill(engine) -> None:
    runner = ModelRunner(engine.runner.loaded)
    long = runner.prepare(long_request(tokens=6))
    budget = long.num_prompt_tokens // 3 + 2  # 2 layers per step beside one decode row
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=budget), num_layers=len(runner.adapter.layers))
    running = runner.prepare(short_request())
    scheduler.add_request(running)
    tokens: dict[str, list[int]] = {}
    while not tokens.get(running.request_id):  # (its own prefill may be sliced too)
        drive(runner, scheduler, tokens)
    scheduler.add_request(long)
    slices = 0
    while not tokens.get(long.request_id):
        before = len(tokens[running.request_id])
        scheduled, _ = drive(runner, scheduler, tokens)
        assert len(tokens[running.request_id]) == before + 1  # the running row did not stall
        slices += 1
    assert slices == 3
    while scheduler.has_work():
        drive(runner, scheduler, tokens)
    assert tokens[long.request_id] == alone(engine, long_request(tokens=6))
    assert tokens[running.request_id] == alone(engine, short_request())


# --- the runner's side, on hand-built scheduler outputs (as tests/core/test_scheduler.py does the
# scheduler's side on hand-built runner outputs) -----------------------------------------------------

def finish_alone(runner: ModelRunner, request: Request, first: dict) -> list[int]:
    """Decode `request` (its prefill done, first token in `first`) to its last token."""
    request.append_token(first[request.request_id], time.monotonic())
    while request.num_output_tokens < request.sampling.max_new_tokens:
        out = runner.execute(SchedulerOutput(decode=[request]))
        request.append_token(out.sampled[request.request_id], time.monotonic())
    return request.output_token_ids


def test_a_row_cancelled_during_a_batched_sliced_prefill_leaves_the_others_exact(engine) -> None:
    runner = ModelRunner(engine.runner.loaded)
    first = runner.prepare(long_request(tokens=5))
    second_request = long_request(tokens=5, prompt="What is in the picture?")
    second = runner.prepare(second_request)
    out = runner.execute(SchedulerOutput(prefill=[first, second], prefill_until=2))
    assert not out.sampled and len(runner._jobs) == 1  # two rows, two layers in
    runner.remove([first.request_id])  # cancelled
    out = runner.execute(SchedulerOutput(prefill=[second], prefill_until=4))
    out = runner.execute(SchedulerOutput(prefill=[second], prefill_until=None))
    assert list(out.sampled) == [second.request_id] and list(out.prefill) == [second.request_id]
    assert [row.request for row in runner.rows] == [second] and runner.cache.batch_size == 1
    assert finish_alone(runner, second, out.sampled) == alone(engine, second_request)


def test_a_batched_sliced_prefill_that_fails_midway_retries_row_by_row(engine, monkeypatch) -> None:
    runner = ModelRunner(engine.runner.loaded)
    originals = [long_request(tokens=4), long_request(tokens=4, prompt="What is in the picture?")]
    prepared = [runner.prepare(r) for r in originals]
    real = forward.PrefillRun.advance

    def advance(run, until=None):
        if run.state.h.shape[0] > 1 and run.next_layer > 0:
            raise torch.OutOfMemoryError("out of memory midway")
        return real(run, until)

    monkeypatch.setattr(forward.PrefillRun, "advance", advance)
    runner.execute(SchedulerOutput(prefill=prepared, prefill_until=3))
    out = runner.execute(SchedulerOutput(prefill=prepared, prefill_until=5))  # fails: each row redoes 0..5 alone
    assert not out.failed and not out.sampled and len(runner._jobs) == 2
    out = runner.execute(SchedulerOutput(prefill=prepared, prefill_until=None))
    assert sorted(out.sampled) == sorted(r.request_id for r in prepared)
    monkeypatch.setattr(forward.PrefillRun, "advance", real)
    first = dict(out.sampled)
    runner.remove([prepared[1].request_id])
    assert finish_alone(runner, prepared[0], first) == alone(engine, originals[0])
