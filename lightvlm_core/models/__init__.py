"""One adapter per VLM family; `adapter_for(model)` picks it from the config's model_type."""

from torch import nn

from lightvlm_core.errors import UnsupportedModelError
from lightvlm_core.models.base import ModelAdapter, PromptInputs
from lightvlm_core.models.internvl import InternVLAdapter
from lightvlm_core.models.llava import LlavaAdapter
from lightvlm_core.models.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
    "internvl": InternVLAdapter,
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    return ADAPTERS[model_type](model)


__all__ = ["ADAPTERS", "ModelAdapter", "PromptInputs", "adapter_for"]
