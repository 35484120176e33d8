"""A runner builder for tests: the model runner, built after making a tqdm progress bar, as
torch.compile's compile workers do in the engine process (imported there by name)."""

from __future__ import annotations

from typing import Any

from tqdm import tqdm

from lightvlm_core.client import load_runner


def runner_after_a_progress_bar(**kwargs: Any) -> Any:
    for _ in tqdm(range(2), disable=True):
        pass
    return load_runner(**kwargs)
