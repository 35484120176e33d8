"""A real `lightvlm serve` (the bundled demo model, an API key set) and a headless Chromium driven
by Selenium. Needs Debian's `chromium` and `chromium-driver` (apt-get install chromium
chromium-driver); the tests are skipped, saying so, where they are missing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "ui-test-key"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    url: str
    log: Path  # the server's stdout and stderr


@contextlib.contextmanager
def live_server(log_path: Path, extra_env: dict[str, str]) -> Iterator[LiveServer]:
    """`lightvlm serve` (the bundled demo model, CPU) on a free port; stopped by its PID afterwards."""
    port = free_port()
    env = {**os.environ, "LIGHTVLM_DEVICE": "cpu", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           **extra_env}  # fmt: skip
    for name in ("LIGHTVLM_MODEL", "LIGHTVLM_SERVED_MODEL_NAME", "LIGHTVLM_API_KEY"):
        if name not in extra_env:
            env.pop(name, None)
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT,
                                env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield LiveServer(base, log_path)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo model served with LIGHTVLM_API_KEY set (the playground tests)."""
    log_path = tmp_path_factory.mktemp("ui-server") / "serve.log"
    with live_server(log_path, {"LIGHTVLM_API_KEY": API_KEY}) as live:
        yield live.url


@pytest.fixture(scope="session")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The demo model served as `make serve` serves it: no API key, default name."""
    log_path = tmp_path_factory.mktemp("open-server") / "serve.log"
    with live_server(log_path, {}) as live:
        yield live


@pytest.fixture(scope="session")
def api_key() -> str:
    return API_KEY


@pytest.fixture(scope="session")
def browser() -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1280,900", "--disable-extensions"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
