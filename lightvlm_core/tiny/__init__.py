"""Random-init tiny models of real VLM architectures, with working processors (test builders).

`make_tiny(family, out_dir, seed)` writes a Hugging Face model directory that loads fully offline
with `AutoProcessor.from_pretrained` and `AutoModelForImageTextToText.from_pretrained`. One module
per family says what its tiny model looks like; `common` holds the shared tokenizer recipe and
dims. Everything is deterministic in `seed`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedConfig

from lightvlm_core.tiny.common import TinyFamily, generation_config, init_model
from lightvlm_core.tiny.gemma3 import GEMMA3
from lightvlm_core.tiny.idefics3 import IDEFICS3, SMOLVLM
from lightvlm_core.tiny.internvl import INTERNVL
from lightvlm_core.tiny.llava import LLAVA
from lightvlm_core.tiny.llava_onevision import LLAVA_ONEVISION
from lightvlm_core.tiny.mistral3 import MISTRAL3
from lightvlm_core.tiny.qwen3_vl import QWEN3_VL
from lightvlm_core.tiny.qwen_vl import QWEN2_5_VL, QWEN2_VL

BUILDERS: dict[str, TinyFamily] = {
    "llava": LLAVA,
    "qwen2_vl": QWEN2_VL,
    "qwen2_5_vl": QWEN2_5_VL,
    "internvl": INTERNVL,
    "qwen3_vl": QWEN3_VL,
    "gemma3": GEMMA3,
    "idefics3": IDEFICS3,
    "smolvlm": SMOLVLM,
    "llava_onevision": LLAVA_ONEVISION,
    "mistral3": MISTRAL3,
}
FAMILIES = tuple(BUILDERS)


def make_tiny(family: str, out_dir: str | Path, seed: int = 0,
              configure: Callable[[PreTrainedConfig], None] | None = None) -> Path:
    """Write a random-init tiny `family` model plus its processor into `out_dir` and return it.

    The directory holds float32 safetensors weights, config.json, generation_config.json (eos/pad
    equal to the tokenizer's) and the processor files (tokenizer, image/video processor, chat template).
    `configure` changes the family's config in place before the weights are drawn (e.g. wider heads).
    """
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    builder = BUILDERS[family]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = builder.tokenizer()
    processor = builder.processor(tokenizer)
    config = builder.config(tokenizer)
    if configure is not None:
        configure(config)
    model = init_model(config, seed)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


__all__ = ["BUILDERS", "FAMILIES", "TinyFamily", "make_tiny"]
