"""Service settings, read from the environment (prefix LIGHTVLM_)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lightvlm_core.client import SchedulerConfig
from lightvlm_core.types import auto_switch, preset_names

MiB = 1024 * 1024
# lightvlm_core.loading.DEMO_MODEL_DIR's name (app/ does not import the torch side for a constant).
DEMO_MODEL_NAME = "shapes-demo"


def served_name_of(model: str | None) -> str:
    """The public name of a model: a hub id as it is, a local directory by its own name (a
    filesystem path is never shown to clients), the bundled demo model when unset."""
    if not model:
        return DEMO_MODEL_NAME
    path = Path(model).expanduser()
    if path.is_dir() or model.startswith(("/", ".", "~")):
        return path.resolve().name or model
    return model


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LIGHTVLM_", env_ignore_empty=True, extra="ignore")

    # model and engine
    model: str | None = None
    """HF hub id or local directory; unset: the bundled demo model."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    preset: Literal[preset_names()] = "none"
    """Default acceleration preset; requests may override it."""
    trust_remote_code: bool = False
    served_model_name: str | None = None
    """Name in /v1/models, the `model` field and the metrics label; unset: the hub id or the model
    directory's own name (`shapes-demo` for the bundled model), never a path. An app built around
    a given engine (tests) uses that engine's name instead."""
    warmup: bool = True
    compile: bool = True
    """Compile the decode step with torch.compile on CPU and CUDA, and the prefill on CPU (warm-up
    then compiles them, up to a few minutes on a first start); off: every step runs eagerly (what
    parity tests check)."""
    packed_weights: Literal["auto", "true", "false"] = "auto"
    """CPU: the compiled prefill's linear weights (and an eager vision tower's) packed once into
    oneDNN's layout (lightvlm_core/packed_weights.py, which the engine process reads from the same
    variable); auto: where the copies fit in a quarter of the memory available at start-up."""
    engine_process: bool = True
    """Run the engine in its own process (restarted if it dies); off: a thread of the API process."""

    # scheduling
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_queue: int = Field(64, ge=0, le=100_000)
    """Requests that may wait for a free batch row; beyond that: 429."""
    max_num_batched_tokens: int = Field(2048, ge=1)
    """Per-step token budget (decodes count 1, a prefill the tokens each LLM layer runs, averaged
    over the layers: its prompt less what token reduction removes): bounds how long a burst of
    prefills can hold up running streams."""
    max_new_tokens: int = Field(1024, ge=1)
    """Upper bound on a request's max_new_tokens."""
    request_timeout_s: float = Field(300.0, gt=0)
    shutdown_grace_s: float = Field(10.0, ge=0)
    """On SIGTERM/SIGINT: stop admitting, give in-flight requests this long to finish, then exit."""

    # intake limits
    max_body_bytes: int = Field(32 * MiB, ge=1024)
    max_image_bytes: int = Field(10 * MiB, ge=1024)
    max_image_pixels: int = Field(4096 * 4096, ge=64)
    max_image_aspect_ratio: float = Field(50.0, ge=1)
    """Longer side / shorter side. Processors resize the shorter side up, so a 1 x 10^6 image
    (tiny as a PNG) would become gigabytes of pixels: refused before decoding."""
    max_images_per_request: int = Field(4, ge=0, le=64)
    max_prompt_chars: int = Field(100_000, ge=1)
    max_decoded_pixels: int = Field(4 * 4096 * 4096, ge=64)
    """Decoded image pixels held at once over all requests (from decoding until the request ends):
    a 100 KB PNG can decode to 4096x4096 RGBA. Requests beyond it wait (429 when max_queue wait)."""
    header_timeout_s: float = Field(30.0, gt=0)
    """A request's line and headers must arrive within this long of connecting (or of the previous
    response on the connection); past it a 408 and the connection closed (slowloris)."""
    max_header_bytes: int = Field(65536, ge=1024)
    """A request's line and headers together may take this many bytes; beyond, a 431 and the
    connection closed."""
    body_read_timeout_s: float = Field(60.0, gt=0)
    """A request's whole body must arrive within this long (a trickling upload gets a 408)."""
    max_incomplete_uploads: int = Field(64, ge=1)
    """Bodies being received at once; beyond it a new upload gets a 429 before it is read."""

    # HTTP
    api_key: SecretStr | None = None
    """When set, every route but /health, /ready, /metrics and / needs `Authorization: Bearer <key>`
    (checked before the body is read)."""
    docs_require_api_key: bool = True
    """With an API key set, /docs, /redoc and /openapi.json need it too (off: they stay public)."""
    cors_origins: str = ""
    """Comma-separated allowed origins; empty: CORS off."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error", "critical"] = "info"

    @field_validator("packed_weights", mode="before")
    @classmethod
    def _auto_switch(cls, value: object) -> object:
        return auto_switch(value, "LIGHTVLM_PACKED_WEIGHTS") if isinstance(value, str) else value

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    def with_default_served_name(self) -> Settings:
        """These settings with `served_model_name` filled in from `model` when it is unset."""
        if self.served_model_name:
            return self
        return self.model_copy(update={"served_model_name": served_name_of(self.model)})

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(
            max_batch_size=self.max_batch_size,
            max_queue=self.max_queue,
            max_num_batched_tokens=self.max_num_batched_tokens,
            request_timeout_s=self.request_timeout_s,
        )


@lru_cache
def get_settings() -> Settings:
    return Settings()
