"""The OpenAI-compatible wire format: request and response models (pydantic), the error shape
(`APIError`, validation errors), SSE framing, and the request fields' meaning (stop, seeds).

Why pydantic models for responses too: FastAPI publishes them in `/openapi.json`, so clients
and schema fuzzers see exactly what each endpoint returns. Static ranges (temperature, top_p,
n, logprobs, ...) are declared on the fields so the schema documents them; the app answers a
value out of those ranges with 400, as OpenAI does, and other malformed bodies with 422.

Extensions beyond OpenAI's fields (as vLLM has them): `top_k`, `ignore_eos`; up to 16 stop
strings (OpenAI allows 4; lm-eval sends its task's stop list plus EOS).

Request types are strict, as OpenAI's are: `"stream": "yes"` or `"n": "2"` is a 422, not
coerced. OpenAI parameters this server does not implement (`best_of`, `logit_bias`, the
penalties, `suffix`, tools, `response_format`) are declared so the schema shows them, and a
request that sets one to anything but its neutral value is refused with 400 naming it
(`UNSUPPORTED`): silently ignoring it would return something other than what was asked.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, ClassVar, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 16
MAX_LOGPROBS = 20
# pydantic error types that mean "a value outside its documented range": 400, like OpenAI.
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}
# Union members pydantic names in an error's location ("stop.list[str]"): left out of param.
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|[a-z-]+\[.*\])$")


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = "invalid_request_error" if status < 500 else "server_error"


def error_response(status: int, message: str, type_: str, param=None, code=None) -> JSONResponse:
    error = {"message": message, "type": type_, "param": param, "code": code}
    return JSONResponse({"error": error}, status_code=status)


def sse(payload: dict | str) -> str:
    """One Server-Sent Event as OpenAI frames it: `data: {json}` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice `index`'s engine seed: `seed` itself for the first, distinct ones after it."""
    if seed is None:
        return None
    return (seed + index * 0x9E3779B1) % (2**31 - 1)


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP:
        raise APIError(400, f"stop has {len(stops)} strings; at most {MAX_STOP}", "stop")
    if any(not s for s in stops):
        raise APIError(400, "stop strings must not be empty", "stop")
    return tuple(stops)


def prompt_count(prompt) -> int:
    """How many prompts a completions `prompt` holds (a string or one id list is one)."""
    if isinstance(prompt, str) or not prompt or isinstance(prompt[0], int):
        return 1
    return len(prompt)


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's body validation errors in OpenAI's shape: 400 when every error is a value out
    of its documented range, else 422; `param` is the first error's field path."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _TYPE_TAG.match(str(x))]
    status = 400 if errors and all(e.get("type") in _RANGE_ERRORS for e in errors) else 422
    detail = str(first.get("msg", "")).removeprefix("Value error, ")
    message = f"{'.'.join(loc) or 'body'}: {detail}"
    return error_response(status, message, "invalid_request_error", ".".join(loc) or None)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error: {"error": {"message", "type", "param", "code"}} (OpenAI's shape)."""

    error: ErrorDetail


class StrictModel(BaseModel):
    """A request body part: JSON types are not coerced ("yes" is not a bool, "2" not an int)."""

    model_config = ConfigDict(strict=True)


class StreamOptions(StrictModel):
    include_usage: bool = False


def _not_supported(what: str = "") -> Any:
    return Field(None, description=f"not supported: 400 unless null{what}")


class SamplingFields(StrictModel):
    """The fields completions and chat share."""

    # name -> the values that mean "not used" (a set one is refused with 400)
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "logit_bias": (None, {}),
        "presence_penalty": (None, 0),
        "frequency_penalty": (None, 0),
    }

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="<= 0: greedy; default 1")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, lt=2**31, description="0 or -1: off (vLLM extension)")
    n: int = Field(1, ge=1, le=128)
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOP} strings")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    user: str | None = None
    logit_bias: dict[str, float] | None = _not_supported(" or {}")
    presence_penalty: float | None = _not_supported(" or 0")
    frequency_penalty: float | None = _not_supported(" or 0")


class CompletionRequest(SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        **SamplingFields.UNSUPPORTED,
        "best_of": (None, 1),
        "suffix": (None, ""),
    }

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="a string, strings, token ids, or lists of token ids (used as given)"
    )
    max_tokens: int | None = Field(16, ge=1, description="null: 16")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = _not_supported(" or 1")
    suffix: str | None = _not_supported(' or ""')

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value):
        """One clear message instead of one per union member."""

        def ids(v) -> bool:
            return isinstance(v, list) and all(type(t) is int for t in v)

        if not (
            isinstance(value, str)
            or (isinstance(value, list) and all(isinstance(v, str) for v in value))
            or ids(value)
            or (isinstance(value, list) and all(ids(v) for v in value))
        ):
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of "
                "token-id lists"
            )
        return value


class TextPart(StrictModel):
    type: Literal["text"] = "text"
    text: str


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        **SamplingFields.UNSUPPORTED,
        "tools": (None, []),
        "tool_choice": (None, "none"),
        "functions": (None, []),
        "function_call": (None, "none"),
        "response_format": (None, {"type": "text"}),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default: the rest of the context")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = _not_supported(" or []")
    tool_choice: str | dict | None = _not_supported(' or "none"')
    functions: list[dict] | None = _not_supported(" or []")
    function_call: str | dict | None = _not_supported(' or "none"')
    response_format: dict | None = _not_supported(' or {"type": "text"}')


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """Per token: its text, logprob (None for the first prompt token), the top alternatives
    {text: logprob}, and its character offset in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(StrictModel):
    """vLLM's /tokenize: a text prompt, or a chat (`messages`) through the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = Field(
        None, description="prepend the start token (default: true for prompt, false for messages)"
    )
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None


class DetokenizeRequest(StrictModel):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What lm-eval's remote tokenizer reads: the special tokens as strings (it looks their ids
    up through /tokenize) and the chat template."""

    tokenizer_class: str
    eos_token: str | None
    bos_token: str | None
    pad_token: str | None
    eos_token_id: int | None
    bos_token_id: int | None
    pad_token_id: int | None
    chat_template: str
    model_max_length: int
    vocab_size: int


class Health(BaseModel):
    status: str
