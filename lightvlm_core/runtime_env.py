"""The CPU runtime environment for a process about to start: allocator, OpenMP and thread counts.

vLLM's CPU docs recommend preloading tcmalloc (Debian/Ubuntu `libtcmalloc-minimal4`) and Intel's
OpenMP runtime (`libiomp5.so`, PyPI `intel-openmp`): PyTorch's many small CPU allocations are
cheaper under tcmalloc, and libiomp5's workers wait on a shorter, tunable spin. Preloading only
works for a process that has not started yet, so `runtime_env()` returns environment variables to
give such a process (the engine process, a server, a benchmark child); it never changes this one.

Everything is applied only where it exists: a library that is not installed is skipped, a variable
the caller already set is kept (the caller knows better). Measured A/B on this project's engine:
see README ("Runtime environment"). Turn it off with LIGHTVLM_RUNTIME_ENV=0.

`python -m lightvlm_core.runtime_env` prints the settings as `export` lines, so a shell (the
Dockerfile's entry point, a Makefile) can apply them: `eval "$(python -m lightvlm_core.runtime_env)"`.
"""

from __future__ import annotations

import ctypes.util
import glob
import logging
import os
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from lightvlm_core.types import OFF_WORDS, ON_WORDS

log = logging.getLogger(__name__)

TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
IOMP_NAME = "libiomp5.so"
SYSTEM_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu",
                   "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc(dirs: tuple[str, ...] = SYSTEM_LIB_DIRS) -> str | None:
    """tcmalloc's shared library, or None."""
    for d in dirs:
        for name in TCMALLOC_NAMES:
            if Path(d, name).is_file():
                return str(Path(d, name))
    found = ctypes.util.find_library("tcmalloc_minimal")
    return _resolve(found, dirs) if found else None


def find_iomp(prefixes: tuple[str, ...] | None = None) -> str | None:
    """Intel OpenMP's `libiomp5.so` (pip's intel-openmp puts it in <prefix>/lib), or None."""
    prefixes = prefixes if prefixes is not None else tuple(dict.fromkeys((sys.prefix, sys.base_prefix, "/usr/local")))
    for prefix in prefixes:
        for candidate in (Path(prefix, "lib", IOMP_NAME), *map(Path, glob.glob(f"{prefix}/lib/python3*/site-packages/"
                                                                                  f"*/lib/{IOMP_NAME}"))):
            if candidate.is_file():
                return str(candidate)
    return None


def _resolve(name: str, dirs: tuple[str, ...]) -> str | None:
    for d in dirs:
        if Path(d, name).is_file():
            return str(Path(d, name))
    return None


def switched_off(environ: Mapping[str, str], name: str) -> bool:
    """Whether an on-by-default LIGHTVLM_* switch is set to off ("0", "false", "no", "off")."""
    return environ.get(name, "1").strip().lower() in OFF_WORDS


def switched_on(environ: Mapping[str, str], name: str) -> bool:
    """Whether an off-by-default LIGHTVLM_* switch is set to on ("1", "true", "yes", "on")."""
    return environ.get(name, "0").strip().lower() in ON_WORDS


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def runtime_env(base: Mapping[str, str] | None = None, *, threads: int | None = None,
                tcmalloc: str | None = None, iomp: str | None = None, search: bool = True) -> dict[str, str]:
    """The variables to add to `base` (default: os.environ) for a process about to start.

    - LD_PRELOAD: tcmalloc and libiomp5 where found, in front of any preload `base` already has;
    - OMP_NUM_THREADS: `threads`, default the CPUs this process may use (unless `base` sets it);
    - with libiomp5: KMP_BLOCKTIME=1 (workers stop spinning after 1 ms: on a machine where the
      server, the engine and clients share few cores, long spins steal them) and KMP_TPAUSE=0.

    Returns {} when LIGHTVLM_RUNTIME_ENV=0 in `base`. `tcmalloc`/`iomp` override the search
    (`search=False` with neither: no preload at all; tests use that).
    """
    base = os.environ if base is None else base
    if switched_off(base, "LIGHTVLM_RUNTIME_ENV"):
        return {}
    libs = [tcmalloc or (find_tcmalloc() if search else None), iomp or (find_iomp() if search else None)]
    preload = [p for p in base.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    if search and libs[0] is None and sys.platform == "linux" and not any("tcmalloc" in p for p in preload):
        # measured on the AMD EPYC VM (LLM-heavy model, one stream): prefill 173-182 ms in the
        # engine without it, 152-155 ms with it
        log.warning("tcmalloc is not installed (Debian/Ubuntu: apt-get install libtcmalloc-minimal4): the "
                    "engine runs on glibc's allocator (prefills 12-20% longer in this project's measurements)")
    libs = [lib for lib in libs if lib]
    env: dict[str, str] = {}
    new = [lib for lib in libs if lib not in preload]
    if new:
        env["LD_PRELOAD"] = ":".join(new + preload)
    if "OMP_NUM_THREADS" not in base:
        env["OMP_NUM_THREADS"] = str(threads or usable_cpus())
    if any(lib.endswith(IOMP_NAME) for lib in libs):
        for key, value in (("KMP_BLOCKTIME", "1"), ("KMP_TPAUSE", "0")):
            if key not in base:
                env[key] = value
    return env


def as_exports(env: Mapping[str, str]) -> str:
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())


if __name__ == "__main__":
    print(as_exports(runtime_env()))
