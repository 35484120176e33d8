"""What a prefill costs the step's token budget: the tokens it runs through one LLM layer,
averaged over the layers.

Without reduction that is the prompt's length. With it, every image span keeps
`span_target(keep, original)` of its tokens from each cut on, whichever tokens the method picks,
so the count is known before the prefill runs: an `aggressive` prompt of 793 tokens, 784 of them
image, costs 101 on 32 layers, an eighth of one that keeps them all, and the budget lets that many
more share a step. The vision encoder's work is not counted; the budget bounds the LLM's.
"""

from __future__ import annotations

import math

from lightvlm_core.reduction.base import span_target
from lightvlm_core.reduction.schedule import method_for
from lightvlm_core.types import AccelerationConfig


def prefill_cost(accel: AccelerationConfig, num_layers: int, num_prompt_tokens: int, span_sizes: list[int]) -> int:
    """Tokens per LLM layer, averaged over `num_layers` layers and rounded up, of a prompt whose
    image spans have `span_sizes` tokens."""
    method = method_for(accel) if span_sizes else None
    if method is None:
        return num_prompt_tokens
    text = num_prompt_tokens - sum(span_sizes)

    def tokens_at(keep: float) -> int:
        return text + sum(min(size, span_target(keep, size)) for size in span_sizes)

    if method.where == "pre":
        return tokens_at(method.keep_ratio)
    keeps = [1.0] * num_layers
    for cut, keep in method.stages(num_layers):  # cuts come before their layer, in order
        keeps[cut:] = [keep] * (num_layers - cut)
    return math.ceil(sum(tokens_at(keep) for keep in keeps) / num_layers)
