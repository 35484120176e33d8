"""The ragged batch the compiled and fused decode tests run through an engine and the eager one."""

from __future__ import annotations

from PIL import Image

from lightvlm_core.engine import Engine
from lightvlm_core.types import AccelerationConfig, GenerationRequest, SamplingParams


def requests(n_tokens: int = 8, preset: str = "none", kv: dict | None = None) -> list[GenerationRequest]:
    """Three prompts of different lengths (ragged rows), two with an image."""
    image = Image.new("RGB", (96, 64), (200, 40, 40))
    sampling = SamplingParams(max_new_tokens=n_tokens, ignore_eos=True)
    accel = AccelerationConfig(preset, **(kv or {}))
    return [GenerationRequest("What is in the picture?", [image], sampling, accel),
            GenerationRequest("Tell me a long story about a red square and a blue circle.", [], sampling, accel),
            GenerationRequest("Count.", [image.resize((64, 64))], sampling, accel)]


def tokens(engine: Engine, batch: list[GenerationRequest]) -> list[list[int]]:
    return [r.token_ids for r in engine.generate(batch)]
