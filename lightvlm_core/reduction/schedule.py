"""From a request's AccelerationConfig to a configured reduction method (or None: no reduction).

`preset` names a LightVLM preset (`none`, `light`, `balanced`, `aggressive`: the pyramid with
that preset's stages) or any method of the registry; `keep_ratio` sets the final fraction of
each image span kept (1.0 means no reduction, exactly `none`); `schedule` gives custom LightVLM
stages. Unknown names raise InvalidRequestError listing the valid ones.
"""

from __future__ import annotations

from dataclasses import replace

from lightvlm_core.errors import InvalidRequestError
from lightvlm_core.kv.registry import kv_policy_names
from lightvlm_core.reduction.base import ReductionMethod, check_stages
from lightvlm_core.reduction.registry import PRESET_STAGES, method_class, method_names, preset_names
from lightvlm_core.types import MIN_KV_BUDGET, AccelerationConfig

DEFAULT_SHAPE = "balanced"  # `none` with a keep_ratio: the LightVLM pyramid of this shape


def resolve_acceleration(accel: AccelerationConfig) -> AccelerationConfig:
    """Validate a request's acceleration (names, ranges) and fill in defaults."""
    if accel.preset not in preset_names():
        raise InvalidRequestError(f"unknown preset {accel.preset!r}; choose one of {', '.join(preset_names())}")
    policy = getattr(accel, "kv_policy", None)
    if policy is not None and policy not in kv_policy_names():
        raise InvalidRequestError(f"unknown kv_policy {policy!r}; choose one of {', '.join(kv_policy_names())}")
    if accel.keep_ratio is not None and not 0 < accel.keep_ratio <= 1:
        raise InvalidRequestError(f"keep_ratio must be in (0, 1], got {accel.keep_ratio}")
    if accel.kv_budget is not None and (accel.kv_budget < 0 or 0 < accel.kv_budget < MIN_KV_BUDGET):
        raise InvalidRequestError(f"kv_budget must be 0 (off) or at least {MIN_KV_BUDGET}, got {accel.kv_budget}")
    if accel.schedule is not None:
        try:
            check_stages(tuple(tuple(s) for s in accel.schedule))
        except ValueError as exc:
            raise InvalidRequestError(str(exc)) from None
    return replace(accel, kv_budget=accel.kv_budget or 0)


def method_for(accel: AccelerationConfig) -> ReductionMethod | None:
    """The configured method of an acceleration config, or None when nothing is reduced."""
    if accel.keep_ratio is not None and accel.keep_ratio >= 1:
        return None
    try:
        if accel.preset in method_names():
            cls = method_class(accel.preset)
            return cls() if accel.keep_ratio is None else cls(keep_ratio=accel.keep_ratio)
        return _lightvlm(accel)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None


def _lightvlm(accel: AccelerationConfig) -> ReductionMethod | None:
    stages = tuple(tuple(s) for s in accel.schedule) if accel.schedule else PRESET_STAGES.get(accel.preset)
    if stages is None:  # preset "none"
        if accel.keep_ratio is None:
            return None
        stages = PRESET_STAGES[DEFAULT_SHAPE]
    keep = accel.keep_ratio if accel.keep_ratio is not None else stages[-1][1]
    return method_class("lightvlm")(keep_ratio=keep, schedule=stages)
