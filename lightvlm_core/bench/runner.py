"""Entry point of `lightvlm bench prefill|decode|serve`."""

from __future__ import annotations

import importlib

DEFAULT_PROFILE = {"prefill": "cpu-small", "decode": "cpu-small", "serve": "cpu-small"}


def run_bench(kind: str, profile: str | None = None, as_json: bool = False, out: str | None = None,
              plot: str | None = None, options: dict | None = None) -> int:
    from lightvlm_core.bench.common import emit

    module = importlib.import_module(f"lightvlm_core.bench.{kind}")
    result = module.run(profile or DEFAULT_PROFILE[kind], quiet=as_json, **(options or {}))
    emit(result, as_json, out, module.COLUMNS)
    if plot and hasattr(module, "plot"):
        module.plot(result, plot)
    return 0
