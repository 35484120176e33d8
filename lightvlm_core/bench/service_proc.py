"""Our service as a child process for the serve bench: `python -m app.cli serve` on a free loopback
port, stopped by its PID. The bench never imports app/ or uvicorn (lightvlm_core must not), and
the server gets a process and an interpreter of its own, as in production.

The child's environment is this process's (so LIGHTVLM_COMPILE and friends pass through) plus the
bench's settings (`LIGHTVLM_*` below) and, unless turned off, the allocator / OpenMP set-up of
`lightvlm_core.runtime_env`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from lightvlm_core import runtime_env


def serve_command(model_dir: str, port: int, device: str, dtype: str) -> list[str]:
    """The command that starts our service (app/cli.py's `serve`; the older lightvlm_core.cli one
    where app/cli.py does not exist)."""
    module = "app.cli" if importlib.util.find_spec("app.cli") is not None else "lightvlm_core.cli"
    return [sys.executable, "-m", module, "serve", "--model", model_dir, "--host", "127.0.0.1",
            "--port", str(port), "--device", device, "--dtype", dtype]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def service_env(served_name: str, max_batch_size: int, max_new_tokens: int, tuned: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "LIGHTVLM_SERVED_MODEL_NAME": served_name,
        "LIGHTVLM_MAX_BATCH_SIZE": str(max_batch_size),
        "LIGHTVLM_MAX_QUEUE": "1024",
        "LIGHTVLM_MAX_NEW_TOKENS": str(max(max_new_tokens, 1)),
        "LIGHTVLM_REQUEST_TIMEOUT_S": "3600",
        "LIGHTVLM_LOG_LEVEL": "warning",
        "LIGHTVLM_API_KEY": "",  # the bench sends no key
    })
    if tuned:
        env.update(runtime_env.runtime_env(base=env))
    else:  # the A/B's other arm: nothing preloaded here, nor by the engine process it starts
        env["LIGHTVLM_RUNTIME_ENV"] = "0"
    return env


@dataclass(frozen=True)
class RunningService:
    url: str
    pid: int


@contextlib.contextmanager
def running_service(model_dir: str, served_name: str, *, device: str = "auto", dtype: str = "auto",
                    max_batch_size: int = 8, max_new_tokens: int = 1024, tuned: bool = True,
                    ready_timeout_s: float = 900.0) -> Iterator[RunningService]:
    """Start our service on `model_dir`, wait for /ready, yield its URL and PID, stop it by PID."""
    port = free_port()
    env = service_env(served_name, max_batch_size, max_new_tokens, tuned)
    log = tempfile.NamedTemporaryFile("w+", prefix="lightvlm-bench-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen(serve_command(model_dir, port, device, dtype), env=env, stdout=log,
                            stderr=subprocess.STDOUT, cwd=str(Path(__file__).resolve().parents[2]))
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(proc, url, ready_timeout_s, log.name)
        yield RunningService(url, proc.pid)
    finally:
        stop(proc)
        log.close()
        os.unlink(log.name)


def _wait_ready(proc: subprocess.Popen, url: str, timeout_s: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"our service exited ({proc.returncode}): {_tail(log_path)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"our service was not ready after {timeout_s:.0f}s: {_tail(log_path)}")


def stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM by PID (the service drains and exits), SIGKILL if it is still there after `grace_s`."""
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _tail(path: str, chars: int = 2000) -> str:
    with contextlib.suppress(OSError):
        return Path(path).read_text(errors="replace")[-chars:]
    return ""
