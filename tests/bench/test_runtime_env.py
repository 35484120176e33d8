"""runtime_env: the allocator / OpenMP set-up for a process about to start, only where it exists."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightvlm_core import runtime_env


def fake_libs(tmp_path: Path) -> tuple[str, str]:
    libdir, prefix = tmp_path / "lib", tmp_path / "venv"
    libdir.mkdir()
    (prefix / "lib").mkdir(parents=True)
    (libdir / "libtcmalloc_minimal.so.4").write_bytes(b"")
    (prefix / "lib" / "libiomp5.so").write_bytes(b"")
    return str(libdir), str(prefix)


def test_found_libraries_are_preloaded_in_front_and_thread_settings_added(tmp_path: Path) -> None:
    libdir, prefix = fake_libs(tmp_path)
    tc, iomp = runtime_env.find_tcmalloc((libdir,)), runtime_env.find_iomp((prefix,))
    assert tc == f"{libdir}/libtcmalloc_minimal.so.4" and iomp == f"{prefix}/lib/libiomp5.so"
    env = runtime_env.runtime_env({"LD_PRELOAD": "/x/libother.so"}, tcmalloc=tc, iomp=iomp, threads=3)
    assert env["LD_PRELOAD"] == f"{tc}:{iomp}:/x/libother.so"
    assert env["OMP_NUM_THREADS"] == "3" and env["KMP_BLOCKTIME"] == "1"


def test_what_the_caller_set_is_kept_and_nothing_is_invented(tmp_path: Path) -> None:
    libdir, prefix = fake_libs(tmp_path)
    tc = runtime_env.find_tcmalloc((libdir,))
    env = runtime_env.runtime_env({"OMP_NUM_THREADS": "1", "LD_PRELOAD": tc}, tcmalloc=tc, search=False)
    assert env == {}  # tcmalloc already preloaded, threads set, no libiomp5: no KMP_* either
    assert runtime_env.find_tcmalloc((str(tmp_path / "nowhere"),)) is None
    assert runtime_env.find_iomp((str(tmp_path / "nowhere"),)) is None
    assert runtime_env.runtime_env({"LIGHTVLM_RUNTIME_ENV": "0"}) == {}


def test_exports_are_shell_quoted() -> None:
    assert runtime_env.as_exports({"A": "x y", "B": "1"}) == "export A='x y'\nexport B=1"


def test_a_child_started_with_it_really_maps_the_libraries() -> None:
    env = runtime_env.runtime_env({})
    if "LD_PRELOAD" not in env:
        pytest.skip("neither tcmalloc nor libiomp5 is installed here")
    child = dict(os.environ, **env)
    maps = subprocess.run([sys.executable, "-c", "print(open('/proc/self/maps').read())"], env=child,
                          capture_output=True, text=True, check=True).stdout
    for lib in env["LD_PRELOAD"].split(":"):
        assert Path(lib).name in maps


def test_a_missing_tcmalloc_is_warned_about(monkeypatch, caplog) -> None:
    monkeypatch.setattr(runtime_env, "find_tcmalloc", lambda: None)
    monkeypatch.setattr(runtime_env.sys, "platform", "linux")
    with caplog.at_level("WARNING", logger="lightvlm_core.runtime_env"):
        runtime_env.runtime_env({})
    assert "apt-get install libtcmalloc-minimal4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lightvlm_core.runtime_env"):
        runtime_env.runtime_env({"LD_PRELOAD": "/opt/lib/libtcmalloc.so.4"})  # the caller preloads one
        runtime_env.runtime_env({}, search=False)  # nothing searched: nothing to warn about
    assert caplog.text == ""
