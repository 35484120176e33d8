"""Typed errors raised by the engine. The service maps them to HTTP status codes."""


class LightVLMError(Exception):
    """Base class for every error the engine raises on purpose."""

    error_type = "internal_error"


class InvalidRequestError(LightVLMError, ValueError):
    """The request itself is wrong (bad field values, empty prompt, ...): a 4xx."""

    error_type = "invalid_request"


class ImageError(InvalidRequestError):
    """An image could not be decoded or breaks the size limits."""

    error_type = "invalid_image"


class PromptTooLongError(InvalidRequestError):
    """Prompt tokens (+ max_new_tokens) do not fit in the model's context."""

    error_type = "context_length_exceeded"


class ModelLoadError(LightVLMError):
    """The model could not be loaded (missing files, unsupported family, no safetensors)."""

    error_type = "model_load_error"


class UnsupportedModelError(ModelLoadError):
    error_type = "unsupported_model"
