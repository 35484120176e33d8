"""Turning the core's per-step outputs into a request's stream events: incremental
detokenisation, stop strings, logprob texts, metric hooks and the closing done or error event.
Kept apart from client.py, which owns the pipes, the reader thread and the event loops these
events travel over."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from lightvlm_core.client_types import RequestStream
from lightvlm_core.core import RequestOutput
from lightvlm_core.detok import IncrementalDetokenizer
from lightvlm_core.errors import LightVLMError
from lightvlm_core.request import RequestStatus
from lightvlm_core.types import (
    DoneEvent,
    ErrorEvent,
    Event,
    GenerationRequest,
    Timings,
    TokenEvent,
    TokenLogprob,
    Usage,
)

if TYPE_CHECKING:
    from lightvlm_core.client import EngineClient


class TrackedRequest:
    """The client's state of one request: its stream, detokeniser, and metric timestamps."""

    def __init__(self, request: GenerationRequest, stream: RequestStream, tokenizer: Any) -> None:
        self.request = request
        self.stream = stream
        self.detok = IncrementalDetokenizer(tokenizer, request.sampling.stop)
        self.accepted: asyncio.Future[int] = stream._loop.create_future()
        self.settled = False  # accepted or rejected (set on the reader thread, unlike the future)
        self.num_prompt_tokens = 0
        self.num_tokens = 0
        self.last_token_time: float | None = None
        self.stopping = False  # a stop string matched: later tokens are dropped


def request_events(client: EngineClient, tracked: TrackedRequest, out: RequestOutput) -> list[Event]:
    """The events of one step's output for `tracked` (runs on the client's reader thread)."""
    events: list[Event] = []
    if out.first_token is not None:
        ttft_s, queue_s, prefill_s = out.first_token
        client._observe("on_admitted", queue_s, prefill_s, tracked.num_prompt_tokens)
    if out.finish_reason is not None and not tracked.settled:  # ended before it was accepted
        error_type, message = out.error or ("cancelled", "the request was cancelled")
        error = LightVLMError(message)
        error.error_type = error_type
        client._resolve(out.request_id, error=error)
        return []
    for i, token_id in enumerate(out.new_token_ids):
        if tracked.stopping:
            break
        events.append(_token_event(client, tracked, token_id, out, i))
    if out.finish_reason is None:
        return events
    client._forget(out.request_id)
    if out.finish_reason != "error" and events and isinstance(events[-1], TokenEvent):
        events[-1].text += tracked.detok.finish()
    reason = "stop" if tracked.stopping and out.finish_reason == "length" else out.finish_reason
    client._observe("on_finished", reason, out.e2e_s or 0.0)
    if reason == "error":
        error_type, message = out.error or ("internal_error", "the request failed")
        events.append(ErrorEvent(error_type, message))
    else:
        usage, timings = Usage(**(out.usage or {})), Timings(**(out.timings or {}))
        if tracked.stopping:
            usage.completion_tokens = tracked.num_tokens
        events.append(DoneEvent(reason, usage, timings, kept_patches=out.kept_patches))
    return events


def _token_event(client: EngineClient, tracked: TrackedRequest, token_id: int, out: RequestOutput,
                 i: int) -> TokenEvent:
    now = time.monotonic()
    if tracked.num_tokens == 0 and out.first_token is not None:
        client._observe("on_token", out.first_token[0], None)
    else:
        client._observe("on_token", None, now - (tracked.last_token_time or now))
    tracked.last_token_time = now
    index = tracked.num_tokens
    tracked.num_tokens += 1
    is_eos = token_id in client._eos and not tracked.request.sampling.ignore_eos
    text = "" if is_eos else tracked.detok.add(token_id)
    event = TokenEvent(index=index, token_id=token_id, text=text)
    if out.new_logprobs:
        lp = out.new_logprobs[i]
        event.logprob = TokenLogprob(_token_text(client.tokenizer, token_id), lp.logprob)
        event.top_logprobs = [TokenLogprob(_token_text(client.tokenizer, t), v) for t, v in lp.top]
    if tracked.detok.stopped and not tracked.stopping:
        tracked.stopping = True  # the engine ends it at this token; the done event follows
        client._abort(tracked.request.request_id, RequestStatus.FINISHED_STOPPED, num_output_tokens=index + 1)
    return event


def _token_text(tokenizer: Any, token_id: int) -> str:
    """One token's own text, special tokens included (what a logprob entry names)."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)
