"""The engine's warm-up: tiny requests through a runner before it reports ready, so the first real
requests do not pay for lazy initialisation and compilation (one compiled decode program per
batch-size range, the compiled prefill's graphs)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from lightvlm_core.scheduler import Scheduler, SchedulerConfig
from lightvlm_core.types import GenerationRequest, SamplingParams

if TYPE_CHECKING:
    from lightvlm_core.core import Runner


# The compiled decode step's graphs (compiled_decode.py): batch 1, 2 to its `few_rows` (at most
# KERNEL_ROWS, 8) rows, more rows
WARM_UP_BATCHES = (1, 2, 9)


def warm_up(runner: Runner) -> None:
    """Tiny requests through the runner, so the first real ones do not pay for lazy init: one alone,
    then two together, then nine (a compiled decode step compiles once for each of
    WARM_UP_BATCHES' batch-size ranges)."""
    from PIL import Image

    def request() -> GenerationRequest:
        return GenerationRequest("Describe the image.", [Image.new("RGB", (64, 64), (127, 127, 127))],
                                 SamplingParams(max_new_tokens=3, ignore_eos=True))

    for batch in WARM_UP_BATCHES:
        _run_alone(runner, [runner.prepare(request()) for _ in range(batch)])


def _run_alone(runner: Runner, requests: list) -> None:
    """Run `requests` to the end on an otherwise idle runner."""
    scheduler = Scheduler(SchedulerConfig(max_batch_size=len(requests), max_queue=0, request_timeout_s=None))
    for prepared in requests:
        scheduler.add_request(prepared)
    while scheduler.has_work():
        scheduled = scheduler.schedule(time.monotonic())
        output = runner.execute(scheduled)
        scheduler.update_from_output(scheduled, output, time.monotonic())
    runner.remove_all()
