"""Our C++ CPU kernels (lightvlm_core/kernels/*.cpp: the prefill and decode attention of
cpu_attention.py, the few-row linear of cpu_linear.py, LightVLM's greedy token choice of
reduction/lightvlm.py), built as one extension on first use with
torch.utils.cpp_extension (g++ with OpenMP, ~20-30 s, cached per user in torch's extensions folder;
the service's image has g++ for inductor anyway). Each module defines its ops' schemas and decides
where its kernels are used; this one only builds them.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from lightvlm_core.compiling import failure_summary

log = logging.getLogger(__name__)

SOURCES = [Path(__file__).resolve().parent / "kernels" / name
           for name in ("prefill_attention.cpp", "decode_attention.cpp", "row_linear.cpp", "diverse_topk.cpp",
                        "decode_layers.cpp")]

# -fopenmp: at::parallel_for is a header template, serial unless the extension itself is built with
# OpenMP (until 2026-12-04 it was not: the kernels ran on one thread)
CFLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mfma",
          "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
LDFLAGS = ["-fopenmp"]


@functools.cache
def kernels_built() -> bool:
    """Whether the kernels are built: an AVX-512 CPU and a build that worked."""
    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    venv_bin = Path(sys.executable).parent  # pip's ninja, where the venv is not on PATH
    if shutil.which("ninja") is None and (venv_bin / "ninja").exists():
        os.environ["PATH"] = f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"
    try:
        from torch.utils.cpp_extension import load

        load("lightvlm_cpu_kernels", [str(source) for source in SOURCES], is_python_module=False, verbose=False,
             extra_cflags=CFLAGS, extra_ldflags=LDFLAGS)
    except Exception as exc:  # no compiler, a failed build: SDPA and inductor's loops
        log.warning("the CPU kernels could not be built; attention stays on SDPA, few-row linears on "
                    "inductor's loops: %s", failure_summary(exc))
        return False
    return True
