"""The scheduling policy, tested with hand-built runner outputs and no model, no threads, no clock."""

from __future__ import annotations

import pytest

from lightvlm_core.request import Request, RequestStatus
from lightvlm_core.scheduler import (
    PrefillReport,
    QueueFullError,
    RunnerOutput,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from lightvlm_core.types import AccelerationConfig, SamplingParams

EOS = 2


def make_request(rid: str, num_prompt_tokens: int = 10, max_new_tokens: int = 5, arrival: float = 0.0,
                 max_context: int = 4096, ignore_eos: bool = False) -> Request:
    return Request(rid, num_prompt_tokens, SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=ignore_eos),
                   AccelerationConfig(), arrival, max_context, frozenset({EOS}))


def sample_all(scheduled: SchedulerOutput, token: int = 7) -> RunnerOutput:
    return RunnerOutput(sampled={r.request_id: token for r in scheduled.prefill + scheduled.decode})


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def sample_finished_prefills(scheduled: SchedulerOutput, token: int = 7) -> RunnerOutput:
    """What the model runner returns: a token for every decode row, and for the prefills only in
    the step that runs their last layer."""
    done = scheduled.prefill if scheduled.prefill_until is None else []
    return RunnerOutput(sampled={r.request_id: token for r in done + scheduled.decode})


def test_decodes_every_running_row_and_fills_free_rows() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=2))
    for rid in "abc":
        s.add_request(make_request(rid))
    first = s.schedule(now=1.0)
    assert ids(first.prefill) == ["a", "b"] and first.decode == []
    assert all(r.status == RequestStatus.RUNNING and r.scheduled_time == 1.0 for r in first.prefill)
    s.update_from_output(first, sample_all(first), now=1.5)
    second = s.schedule(now=2.0)
    assert ids(second.decode) == ["a", "b"] and second.prefill == []  # no free row for c
    assert second.num_scheduled_tokens == {"a": 1, "b": 1}


def test_token_budget_spreads_a_burst_of_prefills_over_steps() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=100), num_layers=8)
    s.add_request(make_request("running", 10, max_new_tokens=50))
    s.update_from_output(out := s.schedule(0.0), sample_finished_prefills(out), 0.1)
    for i in range(5):
        s.add_request(make_request(f"p{i}", 45))
    step = s.schedule(1.0)
    # 1 decode + 2 x 45 = 91: 9 tokens left, so p2 joins and overruns them; the group (135 tokens)
    # runs 99 x 8 // 135 = 5 of its 8 layers now; the step is full, so p3 waits
    assert ids(step.decode) == ["running"] and ids(step.prefill) == ["p0", "p1", "p2"]
    assert step.prefill_until == 5 and step.total_num_scheduled_tokens == 1 + 3 * (45 * 5 // 8)
    s.update_from_output(step, sample_finished_prefills(step), 1.1)
    step = s.schedule(2.0)
    assert ids(step.prefill) == ["p0", "p1", "p2"] and step.prefill_until is None  # the last 3 layers
    s.update_from_output(step, sample_finished_prefills(step), 2.1)
    step = s.schedule(3.0)
    assert ids(step.decode) == ["running", "p0", "p1", "p2"] and ids(step.prefill) == ["p3", "p4"]


def test_a_prompt_that_would_overrun_the_budget_by_more_than_a_step_waits_for_the_next() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=100), num_layers=8)
    s.add_request(make_request("short", 60))
    s.add_request(make_request("long", 141))  # 40 left + 100 < 141: it would hold "short" up two steps
    step = s.schedule(0.0)
    assert ids(step.prefill) == ["short"] and step.prefill_until is None
    s.update_from_output(step, sample_finished_prefills(step), 0.1)
    step = s.schedule(1.0)
    assert ids(step.prefill) == ["long"] and step.prefill_until == 99 * 8 // 141  # the first of its step
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=100), num_layers=8)
    s.add_request(make_request("short", 60))
    s.add_request(make_request("long", 140))  # 40 + 100: joins, the group of 200 takes two steps
    step = s.schedule(0.0)
    assert ids(step.prefill) == ["short", "long"] and step.prefill_until == 4


def test_budget_counts_decodes_first() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=50), num_layers=10)
    for i in range(2):
        s.add_request(make_request(f"r{i}", 20, max_new_tokens=50))
    s.update_from_output(out := s.schedule(0.0), sample_finished_prefills(out), 0.1)
    s.add_request(make_request("long", 100))
    step = s.schedule(1.0)
    # 2 decodes leave 48 tokens: 48 x 10 // 100 = 4 layers (50 would pay for 5)
    assert ids(step.decode) == ["r0", "r1"] and ids(step.prefill) == ["long"] and step.prefill_until == 4


def test_budget_counts_a_prefill_by_its_cost_after_token_reduction() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=100), num_layers=8)
    for i in range(4):  # 100-token prompts whose reduced prefills run 25 tokens per layer on average
        request = make_request(f"r{i}", 100)
        request.prefill_cost = 25
        s.add_request(request)
    s.add_request(make_request("full", 100))
    step = s.schedule(0.0)
    assert ids(step.prefill) == ["r0", "r1", "r2", "r3"] and step.prefill_until is None
    assert step.total_num_scheduled_tokens == 100
    assert make_request("plain", 70).prefill_cost == 70  # without reduction: the prompt's length


def test_a_prompt_longer_than_the_budget_still_runs_as_the_first_prefill_of_a_step() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_num_batched_tokens=16))
    s.add_request(make_request("long", 500))
    s.add_request(make_request("short", 5))
    step = s.schedule(0.0)
    assert ids(step.prefill) == ["long"]  # alone: the short one waits for the next step
    s.update_from_output(step, sample_all(step), 0.1)
    assert ids(s.schedule(1.0).prefill) == ["short"]


def test_a_prefill_over_the_budget_is_sliced_by_layers_between_decode_steps() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_num_batched_tokens=102), num_layers=8)
    s.add_request(make_request("a", 10, max_new_tokens=50))
    s.add_request(make_request("b", 10, max_new_tokens=50))
    s.update_from_output(out := s.schedule(0.0), sample_finished_prefills(out), 0.1)
    assert out.prefill_until is None  # 20 tokens fit: all layers in one step
    s.add_request(make_request("long", 300))
    s.add_request(make_request("next", 5))
    reached = []
    for step_no in range(1, 10):
        step = s.schedule(float(step_no))
        assert ids(step.decode) == ["a", "b"]  # the running rows decode in every step
        assert ids(step.prefill) == ["long"]  # and nothing else starts while it is in progress
        reached.append(step.prefill_until)
        # 100 tokens left x 8 layers / 300 tokens = 2 layers per step
        assert step.num_scheduled_tokens["long"] == 300 * 2 // 8
        updates = s.update_from_output(step, sample_finished_prefills(step), step_no + 0.5)
        assert ("long" in [u.request.request_id for u in updates]) == (step.prefill_until is None)
        if step.prefill_until is None:
            break
    assert reached == [2, 4, 6, None]
    step = s.schedule(10.0)
    assert ids(step.decode) == ["a", "b", "long"] and ids(step.prefill) == ["next"] and step.prefill_until is None


def test_a_sliced_prefill_advances_at_least_a_layer_per_step() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_num_batched_tokens=3), num_layers=3)
    for rid in ("a", "b"):
        s.add_request(make_request(rid, 1, max_new_tokens=50))
    s.update_from_output(out := s.schedule(0.0), sample_finished_prefills(out), 0.1)
    s.add_request(make_request("long", 40))
    reached = []
    for _ in range(3):
        step = s.schedule(1.0)  # 1 token left after the decodes: 1 x 3 layers / 40 rounds to 0
        reached.append(step.prefill_until)
        s.update_from_output(step, sample_finished_prefills(step), 1.1)
    assert reached == [1, 2, None]


def test_a_request_cancelled_while_its_prefill_is_sliced_leaves_the_batch() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=50), num_layers=4)
    s.add_request(make_request("long", 100))
    step = s.schedule(0.0)
    assert step.prefill_until == 2
    s.update_from_output(step, sample_finished_prefills(step), 0.1)
    assert s.finish_request("long", RequestStatus.FINISHED_CANCELLED, 0.2) is not None
    step = s.schedule(1.0)
    assert step.finished_ids == ["long"] and step.is_empty and not s.has_work()


def test_stop_reasons_eos_length_and_context() -> None:
    s = Scheduler(SchedulerConfig())
    s.add_request(make_request("eos", max_new_tokens=10))
    s.add_request(make_request("len", max_new_tokens=2))
    s.add_request(make_request("ctx", num_prompt_tokens=9, max_new_tokens=10, max_context=11))
    s.add_request(make_request("ignore", max_new_tokens=2, ignore_eos=True))
    step = s.schedule(0.0)
    out = RunnerOutput(sampled={"eos": EOS, "len": 7, "ctx": 7, "ignore": EOS})
    updates = {u.request.request_id: u for u in s.update_from_output(step, out, 0.5)}
    assert updates["eos"].finished and updates["eos"].request.finish_reason == "stop"
    assert not updates["len"].finished and updates["len"].first_token
    step = s.schedule(1.0)
    assert step.finished_ids == ["eos"] and ids(step.decode) == ["len", "ctx", "ignore"]
    updates = {u.request.request_id: u for u in s.update_from_output(step, sample_all(step), 1.5)}
    assert updates["len"].request.finish_reason == "length"  # 2 tokens
    assert updates["ctx"].request.finish_reason == "length"  # 9 + 2 = 11 = the context
    assert updates["ignore"].request.finish_reason == "length"  # EOS ignored
    assert s.num_running == 0 and sorted(s.pop_finished_ids()) == ["ctx", "ignore", "len"]


def test_finished_rows_are_passed_to_the_runner_at_the_next_step() -> None:
    s = Scheduler(SchedulerConfig())
    s.add_request(make_request("a", max_new_tokens=1))
    step = s.schedule(0.0)
    s.update_from_output(step, sample_all(step), 0.1)
    assert s.schedule(1.0).finished_ids == ["a"]
    assert s.schedule(2.0).finished_ids == []


def test_a_failed_row_ends_alone() -> None:
    s = Scheduler(SchedulerConfig())
    for rid in "ab":
        s.add_request(make_request(rid))
    step = s.schedule(0.0)
    out = RunnerOutput(sampled={"b": 7}, failed={"a": ("out_of_memory", "no memory")})
    updates = {u.request.request_id: u for u in s.update_from_output(step, out, 0.1)}
    assert updates["a"].finished and updates["a"].request.error == ("out_of_memory", "no memory")
    assert updates["a"].request.finish_reason == "error" and not updates["b"].finished
    assert ids(s.running) == ["b"]


def test_abort_waiting_and_running_and_truncate_at_a_stop_string() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=1))
    s.add_request(make_request("run"))
    s.add_request(make_request("wait"))
    step = s.schedule(0.0)
    s.update_from_output(step, sample_all(step), 0.1)
    step = s.schedule(1.0)
    s.update_from_output(step, sample_all(step), 1.1)  # "run" has 2 tokens
    waiting = s.finish_request("wait", RequestStatus.FINISHED_CANCELLED, 1.2)
    assert waiting.finish_reason == "cancelled" and s.num_waiting == 0
    running = s.finish_request("run", RequestStatus.FINISHED_STOPPED, 1.3, num_output_tokens=1)
    assert running.finish_reason == "stop" and running.output_token_ids == [7] and running.usage().completion_tokens == 1
    assert s.schedule(2.0).finished_ids == ["run"]  # only running rows hold a batch slot
    assert s.finish_request("nobody", RequestStatus.FINISHED_CANCELLED, 2.0) is None


def test_rows_aborted_during_a_step_get_no_update() -> None:
    s = Scheduler(SchedulerConfig())
    s.add_request(make_request("a"))
    step = s.schedule(0.0)
    s.finish_request("a", RequestStatus.FINISHED_CANCELLED, 0.05)
    assert s.update_from_output(step, sample_all(step), 0.1) == []


def test_queue_bound_and_expiry() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_queue=1, request_timeout_s=5.0))
    s.add_request(make_request("a", arrival=0.0))
    s.add_request(make_request("b", arrival=3.0))
    with pytest.raises(QueueFullError):
        s.add_request(make_request("c"))
    s.schedule(0.0)
    assert s.expired(4.9) == [] and s.expired(5.0) == ["a"] and sorted(s.expired(8.0)) == ["a", "b"]


def test_timings_and_usage_come_from_one_place() -> None:
    s = Scheduler(SchedulerConfig())
    request = make_request("a", max_new_tokens=3, arrival=10.0)
    request.num_image_tokens = 64
    s.add_request(request)
    step = s.schedule(10.5)
    out = sample_all(step)
    out.prefill["a"] = PrefillReport(image_tokens_kept=8, image_kept_fraction_layer_avg=0.5, kv_cache_bytes=1000)
    s.update_from_output(step, out, 11.0)
    for now in (11.5, 12.0):
        step = s.schedule(now)
        s.update_from_output(step, sample_all(step), now)
    t, u = request.timings(), request.usage()
    assert (t.queue_ms, t.prefill_ms, t.ttft_ms, t.decode_ms) == (500.0, 500.0, 1000.0, 1000.0)
    assert t.tokens_per_second == 2.0 and request.ttft_s() == 1.0
    assert (u.prompt_tokens, u.completion_tokens, u.image_tokens, u.image_tokens_kept, u.kv_cache_bytes) == (
        10, 3, 64, 8, 1000)


def test_status_order_and_config_validation() -> None:
    assert RequestStatus.WAITING < RequestStatus.RUNNING < RequestStatus.FINISHED_STOPPED
    assert not RequestStatus.RUNNING.is_finished() and RequestStatus.FINISHED_ERROR.is_finished()
    for bad in ({"max_batch_size": 0}, {"max_queue": -1}, {"max_num_batched_tokens": 0}, {"request_timeout_s": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SchedulerConfig(**bad)


def test_admit_false_starts_no_waiting_request_but_decodes_and_sliced_prefills_go_on() -> None:
    s = Scheduler(SchedulerConfig(max_batch_size=4, max_num_batched_tokens=60), num_layers=4)
    s.add_request(make_request("running", 10, max_new_tokens=50))
    s.update_from_output(out := s.schedule(0.0), sample_finished_prefills(out), 0.1)
    s.add_request(make_request("long", 100))
    step = s.schedule(1.0)
    assert ids(step.prefill) == ["long"] and step.prefill_until is not None  # sliced: in progress
    s.update_from_output(step, sample_finished_prefills(step), 1.1)
    s.add_request(make_request("new", 5))
    step = s.schedule(2.0, admit=False)
    assert ids(step.decode) == ["running"] and ids(step.prefill) == ["long"]  # "new" waits
    assert ids(s.waiting) == ["new"]
    while s.prefilling:
        s.update_from_output(step, sample_finished_prefills(step), 2.1)
        step = s.schedule(3.0, admit=False)
    assert ids(step.prefill) == [] and ids(s.waiting) == ["new"]
    assert ids(s.schedule(4.0).prefill) == ["new"]
