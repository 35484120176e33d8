"""Visual-token reduction during prefill: LightVLM pyramid merging and the FastV / random baselines."""

from __future__ import annotations

from lightvlm_core.models.base import ModelAdapter
from lightvlm_core.reduction.merger import TokenMerger
from lightvlm_core.reduction.schedule import PRESETS, PYRAMIDS, ReductionPlan, plan_for, resolve_acceleration
from lightvlm_core.types import AccelerationConfig


def build_prefill_hook(accel: AccelerationConfig, adapter: ModelAdapter, num_image_tokens: list[int]
                       ) -> TokenMerger | None:
    """The prefill hook for a group of rows sharing `accel`; None when nothing is reduced."""
    if not any(num_image_tokens):
        return None
    plan = plan_for(accel, len(adapter.layers))
    if plan is None:
        return None
    return TokenMerger(plan, adapter.scaling)


__all__ = ["PRESETS", "PYRAMIDS", "ReductionPlan", "TokenMerger", "build_prefill_hook", "plan_for",
           "resolve_acceleration"]
