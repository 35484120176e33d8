"""Shared pytest fixtures for the whole test tree.

Tests run fully offline: the Hugging Face hub is disabled at import time, and models come from
`lightvlm_core.tiny.make_tiny` (random-init, built locally).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
# Services the tests start (and their engine processes) run the decode step eagerly: compiling it
# would add ~10-30 s to every engine start. tests/core/test_compiled.py compiles on purpose.
os.environ.setdefault("LIGHTVLM_COMPILE", "0")

from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models run fastest single-threaded, and tests start servers and subprocesses beside the
# test process: more threads only oversubscribe the cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: `tiny_model_dir("qwen2_vl")` -> dir of that tiny model, built once per session."""
    from lightvlm_core.tiny import make_tiny

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = make_tiny(family, tmp_path_factory.mktemp(f"tiny_{family}"))
        return built[family]

    return get
