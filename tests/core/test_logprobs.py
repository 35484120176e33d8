"""Log-probabilities: the runner's values equal log_softmax of plain transformers' logits, and the
sampled token's logprob is among the top ones (first, for greedy)."""

from __future__ import annotations

import asyncio

import pytest
import torch
from PIL import Image

from lightvlm_core.client import EngineClient
from lightvlm_core.runner import load_runner
from lightvlm_core.scheduler import SchedulerConfig
from lightvlm_core.types import DoneEvent, GenerationRequest, SamplingParams, TokenEvent


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return load_runner(str(tiny_model_dir("llava")), device="cpu")


def test_logprobs_match_transformers_and_rank_the_sampled_token(runner) -> None:
    image = Image.new("RGB", (40, 30), (200, 40, 40))
    client = EngineClient.start_in_thread(runner, SchedulerConfig(), runner.tokenizer)

    async def run(**sampling) -> list:
        request = GenerationRequest("What is shown?", [image], SamplingParams(max_new_tokens=4, **sampling))
        return [e async for e in await client.submit(request)]

    try:
        greedy = asyncio.run(run(top_logprobs=5))
        sampled = asyncio.run(run(temperature=1.5, seed=3, logprobs=True))
        plain = asyncio.run(run())
    finally:
        client.shutdown()
    tokens = [e for e in greedy if isinstance(e, TokenEvent)]
    assert isinstance(greedy[-1], DoneEvent) and tokens
    for event in tokens:
        top = [t.logprob for t in event.top_logprobs]
        assert len(top) == 5 and top == sorted(top, reverse=True)
        assert event.logprob.logprob == pytest.approx(top[0])
        assert event.logprob.token == runner.tokenizer.decode([event.token_id])
    # the first token's distribution, from plain transformers
    processor, model = runner.processor, runner.loaded.model
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                          {"type": "text", "text": "What is shown?"}]}], add_generation_prompt=True)
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.no_grad():
        ref = model(**inputs).logits[0, -1].float().log_softmax(-1)
    values, ids = ref.topk(5)
    assert [runner.tokenizer.decode([i]) for i in ids.tolist()] == [t.token for t in tokens[0].top_logprobs]
    assert [t.logprob for t in tokens[0].top_logprobs] == pytest.approx(values.tolist(), abs=1e-4)
    sampled_tokens = [e for e in sampled if isinstance(e, TokenEvent)]
    assert all(e.logprob is not None and e.logprob.logprob <= 0 and not e.top_logprobs for e in sampled_tokens)
    assert all(e.logprob is None for e in plain if isinstance(e, TokenEvent))
