"""A real local Ray cluster for tests: a head node and one worker node, each its own `ray start
--block` process on 127.0.0.1 (own temp dir, free ports), stopped by PID whatever happens."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_pids(app: str = "lightvlm", deployment: str = "LightVLM") -> list[int]:
    """PIDs of this machine's Ray Serve replica processes of the deployment (Ray names them
    `ray::ServeReplica:<app>:<deployment>`)."""
    title = f"ServeReplica:{app}:{deployment}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if title in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
    return pids


class LocalRayCluster:
    def __init__(self, cpus_per_node: int = 1) -> None:
        self.cpus_per_node = cpus_per_node
        self.temp_dir = tempfile.mkdtemp(prefix="lvray")  # short: Ray's socket paths must fit 107 bytes
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.processes: list[subprocess.Popen[bytes]] = []
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                    "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", "LIGHTVLM_API_KEY": "",
                    # as README "Scaling out" says for a one-proxy cluster: balance over all replicas
                    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
                    # a throw-away loopback cluster: no token auth (Ray 2.60 may turn it on by default)
                    "RAY_AUTH_MODE": "disabled"}

    def start(self, timeout_s: float = 120) -> None:
        common = ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus_per_node),
                  "--object-store-memory", str(100 * 1024 * 1024), "--disable-usage-stats"]
        self._spawn("head", ["--head", "--port", str(self.gcs_port), "--temp-dir", self.temp_dir,
                             "--include-dashboard=false", "--ray-client-server-port", str(free_port()),
                             "--dashboard-agent-listen-port", str(free_port()), *common])
        self._wait_for_nodes(1, timeout_s)
        self._spawn("worker", ["--address", self.address, "--dashboard-agent-listen-port", str(free_port()),
                               *common])
        self._wait_for_nodes(2, timeout_s)

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(Path(self.temp_dir) / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.processes.append(subprocess.Popen([str(RAY), "start", *args], stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env, cwd=ROOT, start_new_session=True))

    def _wait_for_nodes(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"ray start exited with {proc.returncode}: {self.logs()}")
            status = subprocess.run([str(RAY), "status", "--address", self.address], capture_output=True,
                                    text=True, env=self.env)
            if status.stdout.count(" node_") >= count:
                return
            time.sleep(2)
        raise TimeoutError(f"{count} Ray node(s) not up within {timeout_s}s: {self.logs()}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-2000:] for p in Path(self.temp_dir).glob("*.log"))

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node's processes), then SIGKILL whatever
        of its process tree (noted before) is still there after a grace period."""
        tree = descendants([p.pid for p in self.processes])
        for proc in reversed(self.processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in tree):
            time.sleep(1)
        for pid in [*tree, *(p.pid for p in self.processes)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for proc in self.processes:
            proc.wait()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def descendants(roots: list[int]) -> list[int]:
    """All processes below `roots` now (from /proc/*/stat parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def local_ray_cluster(cpus_per_node: int = 1) -> Iterator[LocalRayCluster]:
    cluster = LocalRayCluster(cpus_per_node)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def pid_listening_on(port: int, candidates: list[int]) -> int | None:
    """Which of `candidates` holds the listening TCP socket on `port` (from /proc, no psutil)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(fields[9])
    for pid in candidates:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd).removeprefix("socket:[").rstrip("]") in inodes:
                        return pid
    return None
