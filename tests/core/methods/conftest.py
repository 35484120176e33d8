"""Fixtures of the shared method matrix: one engine per tiny family, scenes, an example method."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from PIL import Image

from lightvlm_core.engine import Engine, load_engine
from lightvlm_core.reduction.base import PreLLMMethod
from lightvlm_core.reduction.registry import register, unregister
from lightvlm_core.tiny import FAMILIES


@dataclass
class KeepFirst(PreLLMMethod):
    """The example of "adding a method": one class (+ one registry line): keep the first tokens."""

    keep_ratio: float = 0.5

    def reduce(self, feats: torch.Tensor, text: torch.Tensor, target: int):
        return torch.arange(target, device=feats.device), None, None


@pytest.fixture(scope="session", autouse=True)
def example_method():
    register("keep_first", KeepFirst)
    yield "keep_first"
    unregister("keep_first")


@pytest.fixture(scope="module", params=FAMILIES)
def engine(request, tiny_model_dir) -> Engine:
    return load_engine(str(tiny_model_dir(request.param)), device="cpu")


def scene(w: int, h: int, color: tuple[int, int, int]) -> Image.Image:
    img = Image.new("RGB", (w, h), (235, 235, 235))
    img.paste(color, (w // 5, h // 5, w // 2, h // 2))
    return img


PROMPTS = [
    ("What is shown?", [scene(64, 48, (200, 30, 30))]),
    ("Compare both images", [scene(96, 40, (30, 30, 200)), scene(40, 80, (30, 200, 30))]),
    ("Describe", [scene(160, 120, (200, 200, 30))]),
]
