"""The load-time check: refuse any model that uses something the forward pass does not implement.

forward.py and decode_step.py reproduce the decoder-layer math themselves, so a model that loads
fine in transformers but uses an unknown layer class, attention logit soft-capping, an extra norm
or an unknown attention kind would otherwise run and give silently wrong output. Every refusal names the family
and the missing feature.
"""

from __future__ import annotations

from torch import nn

from lightvlm_core.errors import UnsupportedModelError
from lightvlm_core.models.base import ModelAdapter

ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"}
LAYER_PARTS = {
    "pre": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"},
    "sandwich": {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm",
                 "pre_feedforward_layernorm", "post_feedforward_layernorm"},
}
ATTENTION_KINDS = {"full_attention", "sliding_attention"}
# config flags that change the math; any truthy value is refused
UNSUPPORTED_FLAGS = {
    "attn_logit_softcapping": "attention logit soft-capping",
    "final_logit_softcapping": "final logit soft-capping",
    "use_bidirectional_attention": "bidirectional attention over text",
    "attention_chunk_size": "chunked attention",
}


def check_supported(adapter: ModelAdapter) -> None:
    """Raise UnsupportedModelError if the model needs anything the forward pass lacks."""
    problems = _config_problems(adapter) + _layer_problems(adapter)
    if problems:
        raise UnsupportedModelError(
            f"{adapter.family}: this model uses features the LightVLM forward pass does not implement: "
            + "; ".join(problems)
        )


def _config_problems(adapter: ModelAdapter) -> list[str]:
    text = adapter.text_config
    problems = [f"{what} ({key}={getattr(text, key)!r})" for key, what in UNSUPPORTED_FLAGS.items()
                if getattr(text, key, None)]
    kinds = list(getattr(text, "layer_types", None) or [])
    unknown = sorted(set(kinds) - ATTENTION_KINDS)
    if unknown:
        problems.append(f"attention kind(s) {unknown} in layer_types")
    if len(kinds) not in (0, len(adapter.layers)):
        problems.append(f"layer_types has {len(kinds)} entries for {len(adapter.layers)} layers")
    if "sliding_attention" in kinds and not adapter.supports_sliding_window:
        problems.append("sliding-window attention layers (not implemented for this family)")
    if any(spec.attention == "sliding" and not spec.window for spec in adapter.layer_specs):
        problems.append("sliding-window layers without a sliding_window size")
    return problems


def _layer_problems(adapter: ModelAdapter) -> list[str]:
    problems: list[str] = []
    expected_parts = LAYER_PARTS[adapter.norm_layout]
    for i, layer in enumerate(adapter.layers):
        name = type(layer).__name__
        if name not in adapter.layer_classes:
            problems.append(f"layer {i}: decoder layer class {name} (supported: {', '.join(adapter.layer_classes)})")
            continue
        parts = {n for n, _ in layer.named_children()}
        if parts != expected_parts:
            extra, missing = sorted(parts - expected_parts), sorted(expected_parts - parts)
            problems.append(f"layer {i}: unexpected layer parts {extra} / missing {missing} "
                            f"for the {adapter.norm_layout!r} norm layout")
        attn_parts = {n for n, _ in layer.self_attn.named_children()}
        if attn_parts - ATTENTION_PARTS:
            problems.append(f"layer {i}: unknown attention parts {sorted(attn_parts - ATTENTION_PARTS)}")
        problems += _norm_problems(i, layer)
    if not _is_rms_norm(adapter.norm):
        problems.append(f"final norm {type(adapter.norm).__name__} (only RMSNorm variants are implemented)")
    return problems


def _norm_problems(i: int, layer: nn.Module) -> list[str]:
    norms = [(n, m) for n, m in layer.named_children() if n.endswith("norm")]
    norms += [(f"self_attn.{n}", m) for n, m in layer.self_attn.named_children() if n.endswith("norm")]
    return [f"layer {i}: norm {n} is {type(m).__name__} (only RMSNorm variants are implemented)"
            for n, m in norms if not _is_rms_norm(m)]


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith("RMSNorm")
