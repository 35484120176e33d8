"""Presets and schedules: which LLM layers cut image tokens, and how many each keeps.

A schedule is a tuple of stages (layer, keep): before `layer`, every image span is reduced to
`keep` x its ORIGINAL token count. Layers below 1 are fractions of the model's depth. Keep
ratios decrease (a pyramid). `keep_ratio` on a request rescales the preset's stages so that the
final stage keeps exactly that ratio.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lightvlm_core.errors import InvalidRequestError
from lightvlm_core.types import MIN_KV_BUDGET, AccelerationConfig

Stages = tuple[tuple[float, float], ...]

# Final keep ratio 35% / 10% / 3%. Cuts start early so that the layer-averaged kept fraction,
# which is what prefill FLOPs follow, is small; the final few percent are reached by mid-depth.
PYRAMIDS: dict[str, Stages] = {
    "light": ((0.1, 0.7), (0.25, 0.5), (0.5, 0.35)),
    "balanced": ((0.1, 0.5), (0.25, 0.25), (0.5, 0.1)),
    "aggressive": ((0.06, 0.3), (0.125, 0.1), (0.25, 0.03)),
}
# Defaults when a request gives only `kv_budget` or `keep_ratio` without a pyramid preset.
DEFAULT_SHAPE = "balanced"
FASTV_LAYER = 2  # FastV's K: one cut after the first two layers
FASTV_KEEP = 0.5
PRESET_KV_BUDGET = {"none": 0, "light": 0, "balanced": 0, "aggressive": 0, "fastv": 0, "random": 0}
PRESETS = ("none", "light", "balanced", "aggressive", "fastv", "random")


@dataclass(frozen=True)
class ReductionPlan:
    """A resolved schedule for one model depth. method: "pyramid" | "fastv" | "random"."""

    method: str
    stages: tuple[tuple[int, float], ...]  # (layer index, keep ratio), increasing layers

    @property
    def final_keep(self) -> float:
        return self.stages[-1][1] if self.stages else 1.0


def resolve_acceleration(accel: AccelerationConfig) -> AccelerationConfig:
    """Validate a request's acceleration and fill in preset defaults."""
    if accel.preset not in PRESETS:
        raise InvalidRequestError(f"unknown preset {accel.preset!r}; choose one of {', '.join(PRESETS)}")
    if accel.keep_ratio is not None and not 0 < accel.keep_ratio <= 1:
        raise InvalidRequestError(f"keep_ratio must be in (0, 1], got {accel.keep_ratio}")
    if accel.kv_budget is not None and (accel.kv_budget < 0 or 0 < accel.kv_budget < MIN_KV_BUDGET):
        raise InvalidRequestError(f"kv_budget must be 0 (off) or at least {MIN_KV_BUDGET}, got {accel.kv_budget}")
    if accel.schedule is not None:
        _check_stages(tuple(tuple(s) for s in accel.schedule))
    budget = accel.kv_budget if accel.kv_budget is not None else PRESET_KV_BUDGET[accel.preset]
    return replace(accel, kv_budget=budget)


def plan_for(accel: AccelerationConfig, num_layers: int) -> ReductionPlan | None:
    """The reduction plan of an acceleration config for a model of `num_layers`, or None."""
    if accel.preset in ("fastv", "random"):
        keep = accel.keep_ratio if accel.keep_ratio is not None else FASTV_KEEP
        if keep >= 1:
            return None
        return ReductionPlan(accel.preset, ((min(FASTV_LAYER, num_layers - 1), keep),))
    stages = accel.schedule or PYRAMIDS.get(accel.preset)
    if stages is None:  # preset "none"
        if accel.keep_ratio is None or accel.keep_ratio >= 1:
            return None
        stages = PYRAMIDS[DEFAULT_SHAPE]
    stages = tuple(tuple(s) for s in stages)
    if accel.keep_ratio is not None:
        if accel.keep_ratio >= 1:
            return None
        scale = accel.keep_ratio / stages[-1][1]
        stages = tuple((layer, min(1.0, keep * scale)) for layer, keep in stages)
    resolved = []
    for layer, keep in stages:
        index = round(layer * num_layers) if layer < 1 else int(layer)
        index = min(max(index, 1), num_layers - 1)  # layer 0 sees all tokens: scores need one layer
        if resolved and index <= resolved[-1][0]:
            index = resolved[-1][0] + 1
        if index < num_layers:
            resolved.append((index, keep))
    return ReductionPlan("pyramid", tuple(resolved)) if resolved else None


def _check_stages(stages: Stages) -> None:
    if not stages:
        raise InvalidRequestError("schedule needs at least one (layer, keep) stage")
    last_layer, last_keep = -1.0, 1.0
    for stage in stages:
        if len(stage) != 2:
            raise InvalidRequestError(f"schedule stage {stage!r} must be (layer, keep_ratio)")
        layer, keep = stage
        if layer <= last_layer or layer < 0:
            raise InvalidRequestError("schedule layers must increase and be >= 0")
        if not 0 < keep <= last_keep:
            raise InvalidRequestError("schedule keep ratios must be in (0, 1] and not increase")
        last_layer, last_keep = layer, keep
