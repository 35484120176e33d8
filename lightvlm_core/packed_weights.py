"""oneDNN's own layout of the weights the compiled prefill multiplies by (cpu_linear.OneDnnLinear).

Why: handed a plain row-major float32 weight, oneDNN's matmul reorders it into its blocked layout
on every call, and for row counts it has no fast plan for it is slower still. On the AMD EPYC VM
(2 threads) a 793x256 by 256x1280 product (an LLM-heavy prompt's gate/up) ran at 311 GFLOP/s with
the plain weight and 508 with the weight packed once (`mkldnn._reorder_linear_weight`); at 800 rows
424 and 535; packed, every row count from 100 to 3000 ran at 490-555. In-process, alternating
(scripts/ab_packed_weights.py), a compiled prefill of the 32-layer LLM-heavy model took 0.76x and
0.88x the time at batch 1 in two runs, 0.88x and 0.96x at batch 4. The same copies serve decode
steps beyond the row kernel's rows (fused_decode.py) and eager vision towers
(compiled_prefill.CompiledPrefill.eager_vision).

The packed copies sit beside the plain weights (the decode step's row kernel and the eager passes
read those), so they cost those weights' bytes a second time. LIGHTVLM_PACKED_WEIGHTS: `auto`
(default) packs where the copies fit in a quarter of the memory available at start-up, `true`
always, `false` never. Float32 weights on CPU only: the case measured.

A copy is found by the weight it stands for (its address, shape and strides), ignored once that
weight is written to (its version counter moves) and dropped when the weight is freed.
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from lightvlm_core.fusion import fused_linears
from lightvlm_core.types import auto_switch

log = logging.getLogger(__name__)

_Key = tuple[int, tuple[int, ...], tuple[int, ...]]
_PACKED: dict[_Key, tuple[int, torch.Tensor]] = {}  # key -> (the weight's version when packed, copy)
_ROWS_HINT = 256  # the row count oneDNN picks a layout for; 64-1024 measured alike (see above)


def _key(weight: torch.Tensor) -> _Key:
    return weight.data_ptr(), tuple(weight.shape), tuple(weight.stride())


def packed(weight: torch.Tensor) -> torch.Tensor:
    """`weight`'s packed copy where there is a current one, else `weight` itself."""
    entry = _PACKED.get(_key(weight))
    if entry is None or entry[0] != weight._version:
        return weight
    return entry[1]


def setting(environ: Mapping[str, str] = os.environ) -> str:
    """LIGHTVLM_PACKED_WEIGHTS: "auto" (default), "true" or "false"."""
    return auto_switch(environ.get("LIGHTVLM_PACKED_WEIGHTS"), "LIGHTVLM_PACKED_WEIGHTS")


def prefill_weights(modules: Iterable[nn.Module]) -> list[torch.Tensor]:
    """The weights a prefill multiplies by in `modules` (their submodules included): each fused
    projection's, and each nn.Linear's that is not a slice of one (fusion.py keeps q/k/v and gate/up
    as views into the fused tensor, and the prefill multiplies by the fused one)."""
    fused, plain = [], []
    for root in modules:
        for module in root.modules():
            fused += [linear.weight for linear in fused_linears(module)]
            if isinstance(module, nn.Linear):
                plain.append(module.weight)
    fused_storages = {w.untyped_storage().data_ptr() for w in fused}
    chosen = fused + [w for w in plain if w.untyped_storage().data_ptr() not in fused_storages]
    unique = {_key(w): w for w in chosen if w.dtype == torch.float32 and w.device.type == "cpu" and w.dim() == 2}
    return list(unique.values())


def pack(weights: list[torch.Tensor], environ: Mapping[str, str] = os.environ) -> int:
    """Packs `weights` as the setting says; returns the bytes the copies take (0: none made)."""
    choice = setting(environ)
    size = sum(w.numel() * w.element_size() for w in weights)
    if choice == "false" or not weights:
        return 0
    available = available_memory_bytes()
    if choice == "auto" and available is not None and size > available // 4:
        log.info("prefill weights not packed: %.0f MB of copies, %.0f MB available (LIGHTVLM_PACKED_WEIGHTS=auto "
                 "packs up to a quarter)", size / 2**20, available / 2**20)
        return 0
    try:
        for weight in weights:
            _register(weight)
    except RuntimeError as exc:  # a torch whose oneDNN cannot pack this weight: plain weights, as before
        log.warning("prefill weights not packed: %s", str(exc).splitlines()[0])
        for weight in weights:
            _PACKED.pop(_key(weight), None)
        return 0
    log.info("prefill weights packed for oneDNN: %d weights, %.0f MB of copies", len(weights), size / 2**20)
    return size


def packed_copy(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in oneDNN's layout (a new tensor; nothing registered)."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), _ROWS_HINT)


def _register(weight: torch.Tensor) -> None:
    key = _key(weight)
    if key in _PACKED and _PACKED[key][0] == weight._version:
        return
    _PACKED[key] = (weight._version, packed_copy(weight))
    weakref.finalize(weight, _PACKED.pop, key, None)


def available_memory_bytes() -> int | None:
    """Memory this process can still take: MemAvailable, or less where a cgroup (v2) limit is
    closer; None where neither is readable."""
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            limits.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None
