"""Shared benchmark plumbing: hardware description, medians, progress, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from collections.abc import Iterable

import torch

from lightvlm_core.compiling import compile_enabled
from lightvlm_core.warmup import warm_up
from lightvlm_core.loading import LoadedModel
from lightvlm_core.runner import ModelRunner


def service_runner(loaded: LoadedModel) -> ModelRunner:
    """A runner that runs `loaded` as the service would: compiled where LIGHTVLM_COMPILE says so
    (CPU), and then warmed up, so that no compilation lands inside a timed run."""
    runner = ModelRunner(loaded, compile=compile_enabled())
    if runner.compiled_decode is not None:
        warm_up(runner)
    return runner


def hardware() -> dict:
    info = {
        "cpu": _cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return platform.processor() or "unknown"


def median(values: Iterable[float]) -> float:
    return round(statistics.median(list(values)), 3)


def progress(iterable, total: int, desc: str, quiet: bool):
    """tqdm on a terminal, silent with --json."""
    if quiet:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def emit(result: dict, as_json: bool, out: str | None, table_columns: list[str]) -> None:
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=2)
    if as_json:
        print(json.dumps(result))
        return
    print(f"profile: {result['profile']}  hardware: {result['hardware']}")
    rows = result["results"]
    widths = [max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in table_columns]
    print("  ".join(c.ljust(w) for c, w in zip(table_columns, widths)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(w) for c, w in zip(table_columns, widths)))
    if result.get("markdown"):  # the serve bench's side-by-side table
        print("\n" + result["markdown"])
