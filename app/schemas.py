"""Request and response bodies of the HTTP API (bounds live here, so bad input is a 422)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from lightvlm_core.types import (
    MAX_TOP_LOGPROBS,
    MIN_KV_BUDGET,
    MIN_TEMPERATURE,
    MIN_TOP_P,
    kv_policy_names,
    preset_names,
)

# the registries' names (lightvlm_core.reduction / kv registries): an unknown name is a 422 listing them
PresetName = Literal[preset_names()]
KVPolicyName = Literal[kv_policy_names()]

# Caps that hold on every route (a field unbounded on one route is a way around the other's cap).
MAX_STOP_STRINGS = 16  # every stop string is scanned on every generated token
MAX_STOP_CHARS = 256
MAX_MESSAGES = 256  # chat templating is CPU work proportional to the message count
MAX_CONTENT_PARTS = 64  # per message
MAX_CHOICES = 8  # n: each choice is a batch row
MAX_TOP_K = 1 << 20  # above any vocabulary
MAX_TOKEN_COUNT = 1 << 31  # static bound of token counts; the settings and the model's context bound them further
MAX_SEED = 2**63 - 1


def _utf8_only(value: str) -> str:
    # JSON may carry lone surrogates ("\ud800"); no tokenizer can encode them, so they are a 422 here
    # rather than an error deep in the engine. (Plain `str` fields already refuse them; `str | list`
    # unions do not.)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    return value


Text = Annotated[str, AfterValidator(_utf8_only)]

# Sampling below these is numerically meaningless (logits / 1e-300 overflow; a top_p under float32's
# smallest value rounds to 0 and drops every token) and used to fail the whole decode batch:
# a temperature that small means greedy, and top_p keeps at least the most likely token.
Temperature = Annotated[float, Field(ge=0, le=2), AfterValidator(lambda t: 0.0 if t < MIN_TEMPERATURE else t)]
TopP = Annotated[float, Field(gt=0, le=1), AfterValidator(lambda p: max(p, MIN_TOP_P))]


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class AccelerationOverride(BaseModel):
    """Per-request LightVLM override; unset fields keep the service default."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName | None = None
    keep_ratio: float | None = Field(None, gt=0, le=1)
    kv_policy: KVPolicyName | None = Field(None, description="KV eviction policy used with kv_budget")
    kv_budget: int | None = Field(
        None, ge=0, le=MAX_TOKEN_COUNT, description=f"0: off, else >= {MIN_KV_BUDGET} and <= the model's context"
    )

    @field_validator("kv_budget")
    @classmethod
    def _kv_budget_floor(cls, value: int | None) -> int | None:
        if value is not None and 0 < value < MIN_KV_BUDGET:
            raise ValueError(f"kv_budget must be 0 (off) or at least {MIN_KV_BUDGET}")
        return value


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1)
    image: str | None = Field(None, description="base64 or a data: URL; omit for text-only")
    max_new_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_COUNT, description="default min(256, server limit)")
    temperature: Temperature = Field(0.0, description="0 = greedy")
    top_p: TopP = 1.0
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: list[Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP_STRINGS
    )
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="implies logprobs")
    stream: bool = True
    acceleration: AccelerationOverride | None = None
    return_kept_patches: bool = Field(
        False, description="the done event lists, per image and reduction stage, the kept cells of its token grid"
    )


class GenerateResponse(BaseModel):
    request_id: str
    text: str
    finish_reason: str
    usage: dict[str, Any]
    timings: dict[str, float]


# ---- OpenAI-compatible chat completions --------------------------------------------------------


class ImageURL(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(None, max_length=256)


StopText = Annotated[Text, Field(max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """The subset of OpenAI's chat-completions body that a VLM server can honour.

    OpenAI parameters we do not implement (tools, structured output, penalties, ...) and unknown
    fields are a 400 (app.requests.check_openai_params), as OpenAI answers them; `user`, `metadata`
    and the like are accepted and ignored. `top_k`, `ignore_eos` and `acceleration` are LightVLM
    extensions (pass them with the openai client's `extra_body`).
    """

    model_config = ConfigDict(extra="ignore")

    model: str | None = Field(None, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_COUNT)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKEN_COUNT)
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="choice i of n samples with seed + i")
    stop: StopText | Annotated[list[StopText], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="number of choices")
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS, description="needs logprobs=true")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    ignore_eos: bool = False
    acceleration: AccelerationOverride | None = None
