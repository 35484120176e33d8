"""The engine process ends without leaving anything registered with the API process's
multiprocessing resource tracker (it skips the interpreter's teardown with os._exit, so what is not
cleaned before then would be reported as leaked at every shutdown)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path


def test_engine_process_leaves_no_semaphore_behind(tiny_model_dir: Callable[[str], Path]) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from lightvlm_core.client import EngineClient
        from lightvlm_core.scheduler import SchedulerConfig
        client = EngineClient.launch({str(tiny_model_dir("llava"))!r}, SchedulerConfig(), device="cpu",
                                     warmup=False, builder="progress_bar_runner:runner_after_a_progress_bar")
        assert client.is_running
        client.shutdown()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "leaked semaphore" not in done.stderr, done.stderr[-3000:]
