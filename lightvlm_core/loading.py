"""Load a HuggingFace VLM (hub id or local directory) with its processor, safely.

Safetensors only (no pickle), `trust_remote_code` off unless asked for. Device/dtype `auto`
means CUDA + bfloat16 when a GPU is present, else CPU + float32.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from lightvlm_core.errors import ModelLoadError
from lightvlm_core.models import ModelAdapter, adapter_for

log = logging.getLogger(__name__)

DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "shapes-demo"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    processor: object
    adapter: ModelAdapter
    device: torch.device
    dtype: torch.dtype


def default_model() -> str:
    """`$LIGHTVLM_MODEL`, else the bundled demo model."""
    return os.environ.get("LIGHTVLM_MODEL") or str(DEMO_MODEL_DIR)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    model: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    name = model or default_model()
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    local = Path(name)
    if local.exists() and not any(local.glob("*.safetensors")):
        raise ModelLoadError(f"{name}: no *.safetensors weights (pickle checkpoints are refused)")
    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
        hf_model = AutoModelForImageTextToText.from_pretrained(
            name,
            config=config,
            dtype=torch_dtype,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            attn_implementation="sdpa",
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load model {name!r}: {exc}") from exc
    hf_model.to(dev).eval()
    adapter = adapter_for(hf_model)
    log.info("loaded %s (%s) on %s as %s", name, adapter.family, dev, torch_dtype)
    return LoadedModel(name, hf_model, processor, adapter, dev, torch_dtype)
