"""The checks a request passes before anything runs: its key, model name, text (no lone
surrogates), parameters (none this server would silently ignore), token ids, length against the
context, and how many engine requests it needs against what the queue can ever hold.

Why apart from the endpoints: each check answers one way, 4xx in OpenAI's error shape naming
the field at fault (`APIError`), and every endpoint runs the same ones; a request that passes
them can only fail for reasons of the moment (a full queue: 429; a stopped engine: 503).
"""

from __future__ import annotations

import hmac

from fastapi import Request
from pydantic import BaseModel

from lm.serve.protocol import APIError


def lone_surrogate(value, path: str = "") -> str | None:
    """The dotted path of the first string in `value` (a request model, list, dict or string)
    holding a lone surrogate such as JSON's "\\ud800" (valid JSON, not encodable text), else None.
    """
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, BaseModel):
        items = ((name, getattr(value, name)) for name in type(value).model_fields)
    elif isinstance(value, dict):
        items = value.items()
        for key in value:
            if lone_surrogate(key) is not None:
                return path or "body"
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = lone_surrogate(item, f"{path}.{key}" if path else str(key))
        if found is not None:
            return found
    return None


class RequestChecks:
    """The checks for one served model (see the module docstring)."""

    def __init__(
        self,
        model_name: str,
        api_key: str | None,
        vocab_size: int,
        max_len: int,
        capacity: int | None,
    ):
        self.model_name, self.api_key = model_name, api_key
        self.vocab_size, self.max_len, self.capacity = vocab_size, max_len, capacity

    def key(self, request: Request) -> None:
        """A FastAPI dependency: 401 unless the bearer token is the key (constant-time)."""
        if not self.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise APIError(
                401, "Incorrect or missing API key (send Authorization: Bearer KEY)",
                code="invalid_api_key",
            )  # fmt: skip

    def body(self, body: BaseModel) -> None:
        """Text fields are valid Unicode; the model is this one; no unsupported parameter."""
        where = lone_surrogate(body)
        if where is not None:
            raise APIError(
                400, f"{where}: contains a lone surrogate (such as \\ud800), which is not "
                "valid Unicode text", where, "invalid_text",
            )  # fmt: skip
        self.model(getattr(body, "model", None))
        for name, neutral in getattr(body, "UNSUPPORTED", {}).items():
            if getattr(body, name) not in neutral:
                raise APIError(
                    400, f"{name} is not supported by this server (leave it out, or null)",
                    name, "unsupported_parameter",
                )  # fmt: skip

    def model(self, model: str | None) -> None:
        if model and model != self.model_name:
            raise APIError(
                404, f"model {model!r} does not exist; this server serves {self.model_name!r}",
                "model", "model_not_found",
            )  # fmt: skip

    def ids(self, ids: list[int], param: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise APIError(
                400, f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})", param
            )

    def fits(self, tokens: int, max_tokens: int, *, at_least: bool = False) -> None:
        """400 when a prompt of `tokens` (a lower bound with `at_least`) plus `max_tokens`
        cannot fit the context; the param is the prompt when it alone fills the context."""
        if tokens + max_tokens <= self.max_len:
            return
        size = f"at least {tokens}" if at_least else str(tokens)
        raise APIError(
            400, f"the prompt ({size} tokens) plus max_tokens ({max_tokens}) exceeds the "
            f"model's context of {self.max_len} tokens",
            "prompt" if tokens >= self.max_len else "max_tokens",
        )  # fmt: skip

    def room(self, tokens: int) -> int:
        """The rest of the context after a chat prompt of `tokens` (chat's default max_tokens);
        400 when nothing is left."""
        if tokens >= self.max_len:
            raise APIError(
                400, f"the conversation ({tokens} tokens) fills the model's context of "
                f"{self.max_len} tokens", "messages",
            )  # fmt: skip
        return self.max_len - tokens

    def count(self, choices: int, n: int) -> None:
        """400 for a call of more engine requests (prompts x n) than the queue can ever hold:
        a 429 would ask the client to retry something that can never succeed."""
        if self.capacity is not None and choices > self.capacity:
            raise APIError(
                400, f"this request needs {choices} generations (prompts x n) but the server "
                f"queues at most {self.capacity}; lower n or send fewer prompts per request",
                "n" if n > 1 else "prompt", "too_many_choices",
            )  # fmt: skip
