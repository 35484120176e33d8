"""What the compiled parts (compiled_decode.py, compiled_prefill.py, graphed_decode.py, and the
kernels they choose between: cpu_linear.py, cpu_attention.py) share: the settings that turn them
on, the process-wide preparation of a model, how a failed compile is reported, and how a start-up
measurement times a kernel."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping

import torch

from lightvlm_core.runtime_env import switched_off, switched_on


def compile_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """LIGHTVLM_COMPILE (default on), for the in-process benches that build runners themselves."""
    return not switched_off(environ, "LIGHTVLM_COMPILE")


def cuda_graphs_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """LIGHTVLM_CUDA_GRAPHS (default off): on CUDA, replay the compiled decode step as CUDA graphs
    (graphed_decode.py). Off until measured faster: its tokens equal the eager step's on an H200,
    but no benchmark of it finished there yet (README, "GPU check")."""
    return switched_on(environ, "LIGHTVLM_CUDA_GRAPHS")


def attention_kernel_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """LIGHTVLM_ATTENTION_KERNEL (default on): our C++ CPU kernels (cpu_kernels.py): the compiled prefill's
    attention (LLM and vision), the linears of decode steps of 1-8 rows (cpu_linear.py) and the
    compiled decode step's attention on our kernels where built and measured faster (cpu_attention.py),
    and LightVLM's greedy token choice (reduction/lightvlm.py)."""
    return not switched_off(environ, "LIGHTVLM_ATTENTION_KERNEL")


def prepare_to_compile(model: torch.nn.Module) -> None:
    """What torch.compile needs before the first graph of `model`: no autograd (inference only:
    otherwise AOT autograd traces a backward graph, and fails on the cache writes), and no graphs
    left from a model this process ran before (an engine restarted in-process): graphs are kept per
    code object, not per model, and would hold the old weights. Both are process-wide; a process
    serves one model."""
    for param in model.parameters():
        param.requires_grad_(False)
    torch._dynamo.reset()


def failure_summary(exc: BaseException) -> str:
    """The one line of a compile error that goes into the "runs eagerly from now on" warning."""
    text = str(exc)
    return text.splitlines()[0] if text else type(exc).__name__


def best_time(fn: Callable[[], object], rounds: int) -> float:
    """The fastest of `rounds` timed calls of `fn` in seconds, after one untimed call (warm-up)."""
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
