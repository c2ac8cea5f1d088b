"""Request bodies of every route as pydantic models, in strict mode.

Strict: "10" is not an integer, 1e12 is not an integer, "yes" is not a boolean, NaN is not a
temperature. A wrong value becomes a 400 whose `param` names the field (errors.from_validation).
Fields that can take several JSON types (stop, prompt, message content) are checked by hand so the
message says what is allowed instead of listing one failure per alternative. Unknown fields are
accepted and ignored, as OpenAI's and llama.cpp's servers do; features this server does not have
(tools, grammars, logit bias, n > 1) are refused by name rather than silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qatserve.server.errors import bad_request, from_validation

Finite = Annotated[float, Field(allow_inf_nan=False)]
MAX_STOP = 16  # stop strings per request (OpenAI allows 4)
MAX_STOP_CHARS = 1000  # characters per stop string
MAX_N_PROBS = 20  # the sampler's cap, and OpenAI's top_logprobs maximum
MAX_DRAFT = 64  # speculative.n_max cap (engine/speculative/config.MAX_BLOCK)


def _stop_list(v: Any) -> list[str]:
    if v is None:
        return []
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise ValueError("must be a string or an array of strings")
    if len(items) > MAX_STOP:
        raise ValueError(f"at most {MAX_STOP} stop strings, got {len(items)}")
    for s in items:
        if not s:
            raise ValueError("stop strings must not be empty")
        if len(s) > MAX_STOP_CHARS:
            raise ValueError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got {len(s)}")
    return list(items)


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    # Unsupported features: field -> the values that mean "not used" (anything else is refused).
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    def check(self) -> None:
        """Rules across fields, raising APIError naming the field (after per-field validation)."""


class SamplingFields(_Body):
    """The sampler's knobs (llama.cpp's extensions top_k, min_p, repeat_* are accepted by every route)."""

    temperature: Finite | None = Field(None, ge=0.0, le=2.0)
    top_p: Finite | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0)
    min_p: Finite | None = Field(None, ge=0.0, le=1.0)
    repeat_penalty: Finite | None = Field(None, gt=0.0)
    repeat_last_n: int | None = Field(None, ge=-1)
    presence_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: Finite | None = Field(None, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: Any = Field(default_factory=list)  # validated into list[str] by _stop
    # llama.cpp's per-request speculative fields (flat keys with a dot) and its slot choice; ranges that
    # depend on the server (n_min <= the block, id_slot < -np) are checked by sampling.engine_options.
    spec_n_max: int | None = Field(None, alias="speculative.n_max", ge=0, le=MAX_DRAFT)
    spec_n_min: int | None = Field(None, alias="speculative.n_min", ge=0, le=MAX_DRAFT)
    spec_p_min: Finite | None = Field(None, alias="speculative.p_min", ge=0.0, le=1.0)
    id_slot: int | None = Field(None, ge=-1)
    ignore_eos: bool = False  # llama.cpp's (and vLLM's): end-of-generation tokens are never drawn

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        return _stop_list(v)


class StreamOptions(_Body):
    include_usage: bool = False


class _OpenAIBody(SamplingFields):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"only n=1 is supported, got {v}")
        return v


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Any = ""
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, v: Any) -> str:
        if v is None or isinstance(v, str):
            return v or ""
        if not isinstance(v, list):
            raise ValueError("must be a string or an array of content parts")
        texts = []
        for i, part in enumerate(v):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise ValueError(f"part {i}: unsupported content part type {kind!r} (this server takes text only)")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"part {i}: 'text' must be a string")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(_OpenAIBody):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_N_PROBS)
    UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                    "function_call": (None, "none"), "logit_bias": (None, {}),
                    "response_format": (None, {"type": "text"}), "grammar": (None, ""), "json_schema": (None, {}),
                    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,)}

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: list) -> list:
        if not v:
            raise ValueError("must contain at least one message")
        return v

    def check(self) -> None:
        if self.top_logprobs and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", param="top_logprobs")


class CompletionRequest(_OpenAIBody):
    prompt: Any
    max_tokens: int | None = Field(None, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_N_PROBS)
    echo: bool = False
    UNSUPPORTED = {"suffix": (None, ""), "best_of": (None, 1), "logit_bias": (None, {}),
                    "grammar": (None, ""), "json_schema": (None, {}), "response_format": (None, {"type": "text"})}


class LlamaCompletionRequest(SamplingFields):
    """llama.cpp's /completion: n_predict -1 means "until the context is full"; seed -1 means random."""

    temperature: Finite | None = None  # llama.cpp: any value, <= 0 is greedy
    presence_penalty: Finite | None = None
    frequency_penalty: Finite | None = None
    prompt: Any
    n_predict: int | None = Field(None, ge=-1)
    n_probs: int = Field(0, ge=0, le=MAX_N_PROBS)
    stream: bool = False
    cache_prompt: bool = True  # the prefix cache is server-wide (--no-cache-prompt); accepted for compatibility
    return_tokens: bool = False
    n_keep: int | None = Field(None, ge=-1)  # accepted and ignored: no context shift, the request ends instead
    n_discard: int | None = Field(None, ge=0)
    UNSUPPORTED = {"grammar": (None, ""), "json_schema": (None, {}), "logit_bias": (None, [], {}),
                    "image_data": (None, []), "lora": (None, [])}

    @field_validator("n_predict")
    @classmethod
    def _n_predict(cls, v: int | None) -> int | None:
        if v == 0:
            raise ValueError("must be -1 (until the context is full) or at least 1")
        return v


class TokenizeRequest(_Body):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(_Body):
    tokens: list[int]


class SlotFileRequest(_Body):
    """POST /slots/ID?action=save|restore: the file's name inside --slot-save-path."""

    filename: str


def parse(model: type[_Body], data: dict) -> Any:
    """Validate a parsed JSON body; APIError 400 naming the first bad field."""
    for name, neutral in model.UNSUPPORTED.items():
        if name in data and data[name] not in neutral:
            raise bad_request(f"unsupported parameter {name!r}: this server does not implement it",
                              param=name, code="unsupported_parameter")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        raise from_validation(e.errors(include_url=False, include_input=False)) from None
    except RecursionError:
        raise bad_request("request body is nested too deeply") from None
    body.check()
    return body


__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "DetokenizeRequest",
           "LlamaCompletionRequest", "SlotFileRequest", "TokenizeRequest", "parse"]
