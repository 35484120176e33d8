"""The short soak (tests/app/soak.py) in CI: 48 streams at concurrency 16 on tiny llava, each equal
to the same request alone, nothing lost, RSS bounded, idle gauges back to 0, clean exit."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from soak import run_soak


def test_short_soak(tiny_model_dir: Callable[[str], Path]) -> None:
    leftovers = set(Path(tempfile.gettempdir()).glob("lightvlm-soak-*"))
    summary = run_soak(requests=48, concurrency=16, model=str(tiny_model_dir("llava")))
    assert summary["errors"] == 0, summary["error_examples"]
    assert summary["lost_or_garbled"] == 0 and summary["mismatches"] == 0, summary
    assert all(v == 0 for v in summary["idle_gauges"].values()), summary["idle_gauges"]
    assert summary["rss_growth_mb"] <= summary["max_rss_growth_mb"], summary["rss_mb"]
    assert summary["server_exit_code"] == 0 and summary["ok"]
    assert summary["routes"]["chat"] > 0 and summary["tokens_generated"] > 0
    assert set(Path(tempfile.gettempdir()).glob("lightvlm-soak-*")) == leftovers, "work directory left behind"
