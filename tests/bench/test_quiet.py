"""bench serve waits for a quiet machine between load points (lightvlm_core/bench/quiet.py)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightvlm_core.bench import quiet

pytestmark = pytest.mark.skipif(not quiet.PROC_STAT.exists(), reason="needs Linux /proc/stat")


def test_cpu_times_count_busy_jiffies():
    busy0, total0 = quiet.cpu_times()
    end = time.monotonic() + 0.3
    while time.monotonic() < end:  # keep one CPU busy
        pass
    busy1, total1 = quiet.cpu_times()
    assert 0 <= busy0 <= total0 and total1 > total0
    assert busy1 - busy0 >= 0.1 * (total1 - total0)  # at least part of the window was ours


def test_waits_while_a_process_spins_and_returns_once_it_stops():
    spin_s = 1.5
    spinner = subprocess.Popen([sys.executable, "-c",
                                f"import time\nend = time.monotonic() + {spin_s}\nwhile time.monotonic() < end: pass"])
    try:
        time.sleep(0.3)  # the interpreter is up and spinning
        waited = quiet.wait_until_quiet(max_wait_s=20)
        assert spinner.poll() is not None, "returned while the spinner still ran"
        assert 0.7 <= waited < 15
    finally:
        spinner.kill()
        spinner.wait()


def test_gives_up_after_max_wait():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        start = time.monotonic()
        waited = quiet.wait_until_quiet(max_wait_s=1.0, busy_below=0.01)
        assert 1.0 <= waited < 2.0 and time.monotonic() - start < 2.0
    finally:
        spinner.kill()
        spinner.wait()


def test_without_proc_stat_waits_a_fixed_time(monkeypatch, tmp_path):
    monkeypatch.setattr(quiet, "PROC_STAT", Path(tmp_path / "missing"))
    assert quiet.cpu_times() is None
    waited = quiet.wait_until_quiet(max_wait_s=0.2)
    assert 0.2 <= waited < 1.0


def test_busy_share_sees_a_spinning_process():
    idle = quiet.busy_share(0.3)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = quiet.busy_share(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert 0.0 <= idle <= 1.0
    assert busy >= idle + 0.5 / (os.cpu_count() or 1)  # one more CPU busy, less scheduling noise
