"""The `compare` rows of `lightvlm bench serve`: what users would otherwise run, in this process,
on the same model, prompts and images, before the HTTP part starts (so nothing else competes):

- plain `transformers` `generate()`, one request at a time and as one left-padded batch;
- the engine's own batched loop (`Engine.generate`'s) on the same batch, acceleration off and on
  (no scheduler, no HTTP); `matches_transformers` is the share of greedy outputs equal to plain
  `transformers`'.

Every request generates exactly `max_new_tokens` tokens (EOS off).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
from PIL import Image

from lightvlm_core.bench import loadgen
from lightvlm_core.bench.common import sync
from lightvlm_core.engine import Engine
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams

Row = Callable[..., dict]


class Compare:
    def __init__(self, engine: Engine, items: list[tuple[Image.Image, str]], max_new_tokens: int) -> None:
        self.engine, self.items, self.n = engine, items, max_new_tokens
        self.hf_tokens: list[list[int]] | None = None

    def request(self, i: int, preset: str, max_new_tokens: int | None = None) -> GenerationRequest:
        image, prompt = self.items[i % len(self.items)]
        return GenerationRequest(prompt, [image], SamplingParams(max_new_tokens=max_new_tokens or self.n,
                                                                  ignore_eos=True), AccelerationConfig(preset))

    def rows(self, batch: int, row: Row) -> list[dict]:
        self.warm_up()
        out = [self.transformers(batch, 1, row), self.transformers(batch, batch, row)]
        return out + [self.engine_batch(batch, p, row) for p in ("none", "aggressive")]

    def warm_up(self) -> None:
        """The first runs of a model in a process are slow; the service warms itself up too."""
        with _left_padding(self.engine):
            self._hf_generate(1, 1, max_new_tokens=2)
        self.engine.generate([replace(self.request(0, p), sampling=SamplingParams(max_new_tokens=2))
                              for p in ("none", "aggressive")])

    def transformers(self, num_requests: int, batch: int, row: Row) -> dict:
        """Plain `model.generate()`: greedy, same inputs, `batch` requests per call (left-padded)."""
        with _left_padding(self.engine):
            result, token_ids = self._hf_generate(num_requests, batch)
        if batch == 1:
            self.hf_tokens = token_ids
        name = "transformers-sequential" if batch == 1 else "transformers-batched"
        return row(result, "compare", name, "none", concurrency=batch)

    def _hf_generate(self, num_requests: int, batch: int, max_new_tokens: int | None = None
                     ) -> tuple[loadgen.LoadResult, list[list[int]]]:
        loaded = self.engine.loaded
        model, processor, n = loaded.model, loaded.processor, max_new_tokens or self.n
        config = copy.deepcopy(model.generation_config)
        config.update(do_sample=False, max_new_tokens=n, min_new_tokens=None, eos_token_id=None,
                      pad_token_id=processor.tokenizer.pad_token_id)  # eos off: same as ignore_eos
        records, token_ids = [], []
        start = time.perf_counter()
        for lo in range(0, num_requests, batch):
            chunk = range(lo, min(lo + batch, num_requests))
            sent, clock = time.perf_counter(), _TokenClock()
            items = [self.items[i % len(self.items)] for i in chunk]
            inputs = processor(images=[img for img, _ in items], text=[_chat_text(processor, p) for _, p in items],
                               padding=True, return_tensors="pt").to(loaded.device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(loaded.dtype)
            out = model.generate(**inputs, generation_config=config, streamer=clock)
            sync(loaded.device)
            end, new = time.perf_counter(), out[:, inputs["input_ids"].shape[1]:]
            error = None if new.shape[1] == n else f"generated {new.shape[1]} tokens, not {n}"
            for r, i in enumerate(chunk):
                records.append(loadgen.RequestRecord(i, sent, clock.times, end, "length", error))
                token_ids.append(new[r].tolist())
        return loadgen.LoadResult(records, time.perf_counter() - start), token_ids

    def engine_batch(self, batch: int, preset: str, row: Row) -> dict:
        """The loop of `Engine.generate` on the whole batch, timestamped (no scheduler, no HTTP)."""
        engine, start = self.engine, time.perf_counter()
        prepared = [engine.prepare(self.request(i, preset)) for i in range(batch)]
        row_of = {p.request_id: i for i, p in enumerate(prepared)}
        records = [loadgen.RequestRecord(i, start) for i in range(batch)]
        token_ids: list[list[int]] = [[] for _ in range(batch)]
        outputs = engine.add(prepared)
        while True:
            sync(engine.device)
            now = time.perf_counter()
            for out in outputs:
                i = row_of[out.request_id]
                if out.token is not None:
                    records[i].token_times.append(now)
                    token_ids[i].append(out.token.token_id)
                if out.done is not None:
                    records[i].finish_reason, records[i].end = out.done.finish_reason, now
            if not engine.num_running:
                break
            outputs = engine.step()
        result = row(loadgen.LoadResult(records, time.perf_counter() - start), "compare", f"engine-{preset}",
                     preset, concurrency=batch)
        if preset == "none" and self.hf_tokens is not None:  # greedy parity with plain transformers
            result["matches_transformers"] = round(sum(a == b for a, b in zip(self.hf_tokens, token_ids)) / batch, 3)
        return result


class _left_padding:
    """Left padding for batched `generate()`, inference mode; the tokenizer's side restored after."""

    def __init__(self, engine: Engine) -> None:
        self.tokenizer = engine.loaded.processor.tokenizer
        self.inference = torch.inference_mode()

    def __enter__(self) -> None:
        self.side, self.tokenizer.padding_side = self.tokenizer.padding_side, "left"
        self.inference.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.inference.__exit__(*exc)
        self.tokenizer.padding_side = self.side


class _TokenClock:
    """A `generate(streamer=...)` that timestamps each decoding step (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.times.append(time.perf_counter())
        self._prompt_seen = True

    def end(self) -> None:
        pass


def _chat_text(processor: Any, prompt: str) -> str:
    content = [{"type": "image"}, {"type": "text", "text": prompt}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
