"""One adapter per VLM family; `adapter_for(model)` picks it from the config's model_type."""

from torch import nn

from lightvlm_core.errors import UnsupportedModelError
from lightvlm_core.fusion import fuse_decoder_layers
from lightvlm_core.models.base import LayerSpec, ModelAdapter, PromptInputs
from lightvlm_core.models.check import check_supported
from lightvlm_core.models.gemma3 import Gemma3Adapter
from lightvlm_core.models.idefics3 import Idefics3Adapter, SmolVLMAdapter
from lightvlm_core.models.internvl import InternVLAdapter
from lightvlm_core.models.llava import LlavaAdapter
from lightvlm_core.models.llava_onevision import LlavaOnevisionAdapter
from lightvlm_core.models.mistral3 import Mistral3Adapter
from lightvlm_core.models.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
from lightvlm_core.models.qwen3_vl import Qwen3VLAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llava": LlavaAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen25VLAdapter,
    "internvl": InternVLAdapter,
    "qwen3_vl": Qwen3VLAdapter,
    "gemma3": Gemma3Adapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": SmolVLMAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "mistral3": Mistral3Adapter,
}


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, after the load-time check (UnsupportedModelError if it fails)."""
    model_type = model.config.model_type
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ADAPTERS))}"
        )
    adapter = ADAPTERS[model_type](model)
    check_supported(adapter)
    fuse_decoder_layers(adapter.layers)  # q/k/v and gate/up in one GEMM each (CPU; bitwise equal)
    return adapter


__all__ = ["ADAPTERS", "LayerSpec", "ModelAdapter", "PromptInputs", "adapter_for", "check_supported"]
