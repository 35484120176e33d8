"""Tiny random-init VLMs (`make_tiny`) load offline through the Auto classes and generate."""

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from lightvlm_core.tiny import FAMILIES, make_tiny

EXPECTED = {
    # family: (model class, eos token, image placeholder in the chat prompt)
    "llava": ("LlavaForConditionalGeneration", "</s>", "<image>"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "<|im_end|>", "<|vision_start|><|image_pad|><|vision_end|>"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "<|im_end|>", "<|vision_start|><|image_pad|><|vision_end|>"),
    "internvl": ("InternVLForConditionalGeneration", "<|im_end|>", "<IMG_CONTEXT>"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "<|im_end|>", "<|vision_start|><|image_pad|><|vision_end|>"),
    "gemma3": ("Gemma3ForConditionalGeneration", "<end_of_turn>", "<start_of_image>"),
    "idefics3": ("Idefics3ForConditionalGeneration", "<end_of_utterance>", "<image>"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "<end_of_utterance>", "<image>"),
    "llava_onevision": ("LlavaOnevisionForConditionalGeneration", "<|im_end|>", "<image>"),
    "mistral3": ("Mistral3ForConditionalGeneration", "</s>", "[IMG]"),
}
# what the chat template's generation prompt ends with
ANSWER_START = {"llava": "ASSISTANT:", "mistral3": "[/INST]", "gemma3": "<start_of_turn>model\n",
                "idefics3": "Assistant:", "smolvlm": "Assistant:"}
# family: {(width, height): image tokens in input_ids}
IMAGE_TOKENS = {
    "llava": {(56, 56): 64, (168, 112): 64},
    "qwen2_vl": {(56, 56): 4, (168, 112): 24, (224, 224): 64},
    "qwen2_5_vl": {(56, 56): 4, (168, 112): 24, (224, 224): 64},
    "internvl": {(56, 56): 16, (168, 56): 64, (112, 168): 112},
    "qwen3_vl": {(56, 56): 4, (168, 112): 20, (256, 256): 64},  # 32 px per token
    "gemma3": {(56, 56): 16, (168, 112): 16, (256, 256): 16},  # pooled to a fixed 4x4 per image
    # 16 per tile: 2x2 tiles + a global view, or 1x2 + global for a tall image
    "idefics3": {(56, 56): 80, (168, 112): 80, (56, 168): 48},
    "smolvlm": {(56, 56): 80, (168, 112): 80, (56, 168): 48},
    # base view 16 + unpadded grid of 28 px tiles + one newline per grid row
    "llava_onevision": {(28, 28): 36, (56, 56): 88, (168, 112): 70},
    # one token per 14x14 px cell at native aspect ratio (longest edge <= 112 px)
    "mistral3": {(28, 28): 4, (56, 56): 16, (168, 112): 48},
}
PROMPT = "What is in this image?"


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request: pytest.FixtureRequest, tiny_model_dir) -> tuple[str, object, torch.nn.Module]:
    family = request.param
    path = tiny_model_dir(family)
    return family, AutoProcessor.from_pretrained(path), AutoModelForImageTextToText.from_pretrained(path)


def _chat(processor, with_image: bool, text: str = PROMPT) -> str:
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def _image(size: tuple[int, int]) -> Image.Image:
    gen = torch.Generator().manual_seed(size[0] * 1000 + size[1])
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=gen)
    return Image.fromarray(pixels.numpy())


def _num_image_tokens(processor, model, size: tuple[int, int]) -> int:
    inputs = processor(images=[_image(size)], text=[_chat(processor, True)], return_tensors="pt")
    return int((inputs["input_ids"] == model.config.image_token_id).sum())


def test_loads_real_architecture(tiny):
    family, processor, model = tiny
    model_cls, eos, _ = EXPECTED[family]
    assert type(model).__name__ == model_cls
    assert model.dtype == torch.float32
    assert processor.tokenizer.eos_token == eos
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    assert model.generation_config.pad_token_id == processor.tokenizer.pad_token_id
    text = model.config.get_text_config()
    assert text.num_hidden_layers == 6 and text.num_key_value_heads < text.num_attention_heads
    assert text.vocab_size == len(processor.tokenizer)


def test_chat_template(tiny):
    family, processor, _ = tiny
    _, _, placeholder = EXPECTED[family]
    prompt = _chat(processor, True)
    assert placeholder in prompt and prompt.index(placeholder) < prompt.index(PROMPT)
    assert placeholder not in _chat(processor, False)
    end = ANSWER_START.get(family, "<|im_start|>assistant\n")
    assert prompt.endswith(end)


def test_image_token_counts(tiny):
    family, processor, model = tiny
    counts = {size: _num_image_tokens(processor, model, size) for size in IMAGE_TOKENS[family]}
    assert counts == IMAGE_TOKENS[family]


@pytest.mark.parametrize("with_image", [True, False])
def test_greedy_generate(tiny, with_image: bool):
    family, processor, model = tiny
    images = [_image((168, 112))] if with_image else None
    inputs = processor(images=images, text=[_chat(processor, with_image)], return_tensors="pt")
    out = model.generate(**inputs, do_sample=False, max_new_tokens=5)
    assert 1 <= out.shape[1] - inputs["input_ids"].shape[1] <= 5
    again = model.generate(**inputs, do_sample=False, max_new_tokens=5)
    assert torch.equal(out, again)


def test_batched_generate_pads_left(tiny):
    family, processor, model = tiny
    texts = [_chat(processor, True), _chat(processor, True, "Describe the picture in a few words, please.")]
    images = [_image((56, 56)), _image((112, 168))]
    if family in ("gemma3", "idefics3", "smolvlm"):  # these processors want each prompt's images in a list
        images = [[image] for image in images]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    assert inputs["attention_mask"][:, -1].all()
    out = model.generate(**inputs, do_sample=False, max_new_tokens=4)
    assert out.shape[0] == 2


def test_tokenizer_round_trips_unicode(tiny):
    _, processor, _ = tiny
    tokenizer = processor.tokenizer
    text = "héllo wörld 你好 🙂"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    # multi-byte characters are split over several byte-level tokens
    assert len(ids) > len(text.split())


def test_deterministic_in_seed(tmp_path: Path):
    first = make_tiny("qwen2_vl", tmp_path / "a", seed=3)
    second = make_tiny("qwen2_vl", tmp_path / "b", seed=3)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_unknown_family(tmp_path: Path):
    with pytest.raises(ValueError, match="unknown family"):
        make_tiny("gpt2", tmp_path)
