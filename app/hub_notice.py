"""Before a first start downloads a hub model, say so and how big it is: otherwise `docker
compose up` or `lightvlm serve` sits silent for the minutes that gigabytes take."""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger("app.hub")


def is_hub_id(model: str | None) -> bool:
    return bool(model) and not Path(model).expanduser().exists() and not model.startswith(("/", ".", "~"))


def is_cached(model: str) -> bool:
    """Whether the hub cache (HF_HOME / HF_HUB_CACHE) already holds this model's config."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def weights_size(model: str) -> int | None:
    """Bytes of the model's safetensors files on the hub; None when the hub does not answer."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(model, files_metadata=True, timeout=10)
    except Exception:  # offline, unknown id, rate limit: the download itself will report it
        return None
    sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
    return sum(sizes) or None


def download_notice(model: str | None) -> str | None:
    """The line to log before loading `model`, or None when nothing needs downloading."""
    if not is_hub_id(model) or is_cached(model):
        return None
    size = weights_size(model)
    how_big = f"{size / 1e9:.1f} GB of weights" if size else "size unknown: the hub did not answer"
    return (f"{model} is not in the local Hugging Face cache: downloading it now ({how_big}); "
            "/ready says when it is loaded")


def log_download_notice(model: str | None) -> None:
    message = download_notice(model)
    if message:
        logger.warning(message)
