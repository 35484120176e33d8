"""Visual-token reduction: LightVLM pyramid merging and the baselines, behind two hooks.

Methods live one per file (lightvlm, fastv, pdrop, random_drop: in-LLM; visionzip, divprune,
cdpruner: pre-LLM) and are listed in `registry` (torch-free, read by the CLI, the HTTP schemas,
the settings and the eval). Torch-dependent names are imported lazily, so that reading the
registry from the API process does not load torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightvlm_core.models.base import ModelAdapter
    from lightvlm_core.reduction.hook import ReductionHook
    from lightvlm_core.types import AccelerationConfig


def build_prefill_hook(accel: AccelerationConfig, adapter: ModelAdapter, num_image_tokens: list[int]
                       ) -> ReductionHook | None:
    """The prefill hook for a group of rows sharing `accel`; None when nothing is reduced."""
    from lightvlm_core.reduction.hook import ReductionHook
    from lightvlm_core.reduction.schedule import method_for

    if not any(num_image_tokens):
        return None
    method = method_for(accel)
    if method is None:
        return None
    return ReductionHook(method, len(adapter.layers), adapter.scaling)


def __getattr__(name: str) -> Any:
    if name in ("resolve_acceleration", "method_for"):
        from lightvlm_core.reduction import schedule

        return getattr(schedule, name)
    raise AttributeError(name)


__all__ = ["build_prefill_hook", "method_for", "resolve_acceleration"]
