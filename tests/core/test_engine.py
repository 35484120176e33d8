"""Engine correctness: greedy parity with plain transformers, batching, streaming, bad input."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.errors import ImageError, InvalidRequestError, PromptTooLongError
from lightvlm_core.tiny import FAMILIES
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


def scene(w: int, h: int, color=(200, 30, 30)) -> Image.Image:
    img = Image.new("RGB", (w, h), (240, 240, 240))
    img.paste(color, (w // 4, h // 4, w // 2, h // 2))
    return img


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir(request.param)), device="cpu")


def hf_greedy(engine: Engine, prompt: str, images: list[Image.Image], n: int) -> list[int]:
    processor, model = engine.processor, engine.loaded.model
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images or None, text=[text], return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=n)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def run(engine: Engine, prompt: str, images=(), n: int = 10, **accel):
    request = GenerationRequest(prompt, list(images), SamplingParams(max_new_tokens=n),
                                AccelerationConfig(**accel) if accel else None)
    return engine.generate([request])[0]


CASES = [
    ("What is in the image?", [scene(64, 48)]),
    ("Tell me a story about a cat.", []),
    ("Compare the two pictures.", [scene(64, 48), scene(40, 96, (30, 30, 200))]),
]


@pytest.mark.parametrize("prompt,images", CASES, ids=["image", "text-only", "two-images"])
def test_greedy_parity_with_transformers(engine, prompt, images):
    ref = hf_greedy(engine, prompt, images, 12)
    ours = run(engine, prompt, images, 12)
    # transformers stops at EOS too, so its ids are a prefix-equal list of ours
    assert ours.token_ids == ref
    assert engine.num_running == 0 and engine.kv_cache_bytes() == 0


def test_keep_ratio_one_is_exactly_none(engine):
    prompt, images = CASES[0]
    assert run(engine, prompt, images, keep_ratio=1.0).token_ids == run(engine, prompt, images).token_ids


def test_batched_rows_equal_rows_alone(engine):
    requests = [
        GenerationRequest("What is in the image?", [scene(64, 48)], SamplingParams(max_new_tokens=8, ignore_eos=True)),
        GenerationRequest("Describe it in detail please", [scene(120, 40, (30, 200, 30))],
                          SamplingParams(max_new_tokens=6, ignore_eos=True)),
        GenerationRequest("hello", [], SamplingParams(max_new_tokens=9, ignore_eos=True)),
        GenerationRequest("two", [scene(50, 50), scene(90, 60)], SamplingParams(max_new_tokens=7, ignore_eos=True)),
    ]
    together = engine.generate(requests)
    alone = [engine.generate([r])[0] for r in requests]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [len(r.token_ids) for r in together] == [8, 6, 9, 7]


def test_rows_join_and_leave_between_steps(engine):
    """A row admitted while another is mid-decode gets the same tokens as alone."""
    a = GenerationRequest("What is in the image?", [scene(64, 48)], SamplingParams(max_new_tokens=10))
    b = GenerationRequest("Another question here", [scene(48, 80)], SamplingParams(max_new_tokens=5))
    ref_a, ref_b = engine.generate([a])[0].token_ids, engine.generate([b])[0].token_ids
    got: dict[str, list[int]] = {a.request_id: [], b.request_id: []}

    def take(outputs):
        for o in outputs:
            got[o.request_id].append(o.token.token_id)

    take(engine.add([engine.prepare(a)]))
    for _ in range(3):
        take(engine.step())
    take(engine.add([engine.prepare(b)]))
    while engine.num_running:
        take(engine.step())
    assert got[a.request_id] == ref_a and got[b.request_id] == ref_b


def test_streamed_text_concatenates_to_full_decode(engine):
    request = GenerationRequest("Write something long", [scene(64, 64)], SamplingParams(max_new_tokens=40))
    pieces, ids = [], []
    for out in engine.stream(request):
        pieces.append(out.token.text)
        ids.append(out.token.token_id)
    full = engine.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert "".join(pieces) == full


def test_usage_and_timings(engine):
    result = run(engine, "What is in the image?", [scene(64, 48)], 5)
    u, t = result.usage, result.timings
    assert u.completion_tokens == len(result.token_ids) <= 5
    assert 0 < u.image_tokens == u.image_tokens_kept < u.prompt_tokens
    assert u.kv_cache_bytes > 0
    assert t.prefill_ms > 0 and t.ttft_ms >= t.prefill_ms and t.decode_ms >= 0


def test_bad_input_raises_typed_errors(engine):
    with pytest.raises(InvalidRequestError):
        engine.prepare(GenerationRequest("   "))
    with pytest.raises(ImageError):
        engine.prepare(GenerationRequest("hi", ["not an image"]))  # type: ignore[list-item]
    with pytest.raises(ImageError):
        engine.prepare(GenerationRequest("hi", [Image.new("RGB", (0, 0))]))
    with pytest.raises(PromptTooLongError):
        engine.prepare(GenerationRequest("cat " * (engine.max_context + 10)))
    with pytest.raises(InvalidRequestError):
        engine.prepare(GenerationRequest("hi", acceleration=AccelerationConfig(preset="warp-speed")))
    assert engine.num_running == 0


def test_one_request_passed_twice_is_refused_before_anything_runs(engine):
    request = GenerationRequest("hi", sampling=SamplingParams(max_new_tokens=2))
    with pytest.raises(InvalidRequestError, match="unique"):
        engine.generate([request, request])
    assert engine.num_running == 0
    assert len(engine.generate([request])[0].token_ids) == 2  # alone it runs; after it, its id is free again
    assert len(engine.generate([request])[0].token_ids) == 2


def test_sampling_is_seeded_and_top_k_one_is_greedy(engine):
    def sampled(seed, **kw):
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed, **kw)
        return engine.generate([GenerationRequest("Tell me a story", [], params)])[0].token_ids

    assert sampled(7) == sampled(7)
    assert sampled(7, top_p=0.9) == sampled(7, top_p=0.9)
    greedy = run(engine, "Tell me a story", n=8).token_ids
    assert sampled(3, top_k=1) == greedy


def test_max_new_tokens_and_ignore_eos(engine):
    eos = next(iter(engine.eos_token_ids))
    request = GenerationRequest("hi", [], SamplingParams(max_new_tokens=20, ignore_eos=True))
    prepared = engine.prepare(request)
    # force EOS as the first token by biasing the LM head: ignore_eos must keep going
    with torch.no_grad():
        bias = torch.zeros(engine.adapter.lm_head.weight.shape[0])
        bias[eos] = 1e4
        handle = engine.adapter.lm_head.register_forward_hook(lambda m, i, o: o + bias)
        try:
            outputs = engine.add([prepared])
            while engine.num_running:
                outputs += engine.step()
            stopped = engine.generate([GenerationRequest("hi", [], SamplingParams(max_new_tokens=20))])[0]
        finally:
            handle.remove()
    assert len(outputs) == 20 and outputs[-1].done.finish_reason == "length"
    assert stopped.token_ids == [eos] and stopped.finish_reason == "stop" and stopped.text == ""


def test_messages_give_a_whole_conversation(engine):
    img = scene(64, 48)
    single = GenerationRequest("What is in the image?", [img], SamplingParams(max_new_tokens=5))
    same = GenerationRequest("What is in the image?", [img], SamplingParams(max_new_tokens=5), messages=[
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}])
    assert engine.generate([same])[0].token_ids == engine.generate([single])[0].token_ids
    turns = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red square."}]},
        {"role": "user", "content": [{"type": "text", "text": "And its size?"}]},
    ]
    prepared = engine.prepare(GenerationRequest("And its size?", [img], messages=turns))
    text = engine.tokenizer.decode(prepared.prompt.input_ids)
    assert "A red square." in text and "And its size?" in text
    with pytest.raises(InvalidRequestError):
        engine.prepare(GenerationRequest("x", [], messages=turns))  # one image part, no image
    with pytest.raises(InvalidRequestError):
        engine.prepare(GenerationRequest("x", [img], messages=turns[:2]))  # ends with the assistant


def test_stop_string_ends_generation_with_the_text_cut(engine):
    free = run(engine, "Tell me a story about a cat.", n=24).text
    candidates = [free[i:i + 3] for i in range(4, len(free) - 3)
                  if free[i:i + 3].isprintable() and "\ufffd" not in free[i:i + 3]]
    stop = candidates[0]
    params = SamplingParams(max_new_tokens=24, stop=(stop,))
    result = engine.generate([GenerationRequest("Tell me a story about a cat.", [], params)])[0]
    assert result.finish_reason == "stop"
    assert result.text == free[: free.index(stop)]


def test_numerically_degenerate_sampling_is_safe(engine):
    greedy = run(engine, "Tell me a story", n=6).token_ids
    tiny_t = SamplingParams(max_new_tokens=6, temperature=1e-300, seed=1)
    assert engine.generate([GenerationRequest("Tell me a story", [], tiny_t)])[0].token_ids == greedy
    tiny_p = SamplingParams(max_new_tokens=6, temperature=1.0, top_p=5e-324, seed=1)
    assert engine.generate([GenerationRequest("Tell me a story", [], tiny_p)])[0].token_ids == greedy


def test_kv_budget_below_the_minimum_is_refused(engine):
    for budget in (1, 2, 15):
        with pytest.raises(InvalidRequestError):
            engine.prepare(GenerationRequest("hi", acceleration=AccelerationConfig(kv_budget=budget)))
    run(engine, "hi", n=20, kv_budget=16)  # the smallest allowed budget works
