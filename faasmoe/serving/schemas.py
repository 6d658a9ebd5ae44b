"""OpenAI-compatible request and response bodies (typed, so the OpenAPI schema is exact)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4

# OpenAI parameters this server does not implement, with the values that mean "not used". A request that sets
# one to anything else is refused (400 "`name` is not supported") instead of being silently served without it.
UNSUPPORTED: dict[str, tuple] = {
    "n": (None, 1), "best_of": (None, 1), "echo": (None, False), "suffix": (None, ""),
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "tools": (None, []),
    "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "audio": (None,), "prediction": (None,),
}


class UnsupportedParameter(Exception):
    """A known OpenAI parameter set to a value this server cannot honour (not a ValueError: pydantic must
    let it through, so the server answers with the parameter's name)."""

    def __init__(self, param: str):
        super().__init__(f"`{param}` is not supported by this server")
        self.param = param


def _same(value: object, neutral: object) -> bool:
    """JSON equality that keeps booleans, numbers and null apart (`false` is not `0`, `0.0` is `0`)."""
    if value is None or neutral is None or isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    if isinstance(value, (int, float)) and isinstance(neutral, (int, float)):
        return value == neutral
    return type(value) is type(neutral) and value == neutral


def check_text(text: str, what: str) -> str:
    """Refuse text that is not valid Unicode (a lone surrogate such as "\\ud800" parses from JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} is not valid Unicode (it contains a lone surrogate)") from None
    return text


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, ...)

    model: str = Field(min_length=1, max_length=256)
    temperature: float = Field(1.0, ge=0.0, le=2.0, description="below 1e-5: greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="extension (as in vLLM): keep generating past end-of-sequence")
    return_token_ids: bool = Field(False, description="extension (as in vLLM): each choice (and each streamed "
                                                      "chunk) carries the generated `token_ids`")

    @model_validator(mode="before")
    @classmethod
    def _unsupported(cls, data):
        if isinstance(data, dict):
            for name, neutral in UNSUPPORTED.items():
                if not any(_same(data.get(name), v) for v in neutral):
                    raise UnsupportedParameter(name)
        return data

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s or len(s) > 256 for s in stops):
            raise ValueError("stop sequences must be 1 to 256 characters")
        return [check_text(s, "a stop sequence") for s in stops]


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(description="a string, or one prompt's token ids")
    max_tokens: int | None = Field(16, ge=1)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str | list[int] | list[str]) -> str | list[int] | list[str]:
        for text in [v] if isinstance(v, str) else [p for p in v if isinstance(p, str)]:
            check_text(text, "the prompt")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None

    def text(self) -> str:
        """The message's text; content parts other than text are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return check_text(self.content, "a message")
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(check_text(part["text"], "a message"))
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=1024)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(None, description="with return_token_ids only")


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str | None
    token_ids: list[int] | None = Field(None, description="with return_token_ids only")


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "faasmoe"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


# -- server-sent events: one chunk per `data:` line of a stream -------------------------------------------
# Built with only the fields a chunk carries set, and serialized with exclude_unset, so that each chunk
# has exactly the keys OpenAI's have (a chat delta is `{}` on the final chunk, `token_ids` only when asked).
class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class CompletionChunkChoice(BaseModel):
    index: int = 0
    text: str = ""
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class FaasmoeUsageExtension(BaseModel):
    cold_start_in_prefill: bool | None = Field(None, description="a function cold-started while the first token "
                                                                 "was made (for benchmarks)")


class StreamChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk", "text_completion"]
    created: int
    model: str
    choices: list[ChatChunkChoice] | list[CompletionChunkChoice]
    usage: Usage | None = None
    faasmoe: FaasmoeUsageExtension | None = None

    def sse(self) -> str:
        return f"data: {self.model_dump_json(exclude_unset=True)}\n\n"
