"""A generation request's parameters, its progress, and the outputs the engine reports.

The text side lives here: new tokens become new text by decoding the whole completion so far
(a token can end in the middle of a UTF-8 character, and some tokenizers join pieces
differently in context), and text is held back while it could still turn into a stop string,
so a streamed reply never shows a stop string it later has to take back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lm.errors import RequestError
from lm.inference.sampling import TOP_LOGPROBS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # <= 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None  # the same seed gives the same sample, whatever else runs
    stop: tuple[str, ...] = ()  # the text is cut before the first stop string
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # k >= 0: each new token's logprob and the top-k alternatives
    prompt_logprobs: int | None = None  # echo: each prompt token's logprob given its prefix


@dataclasses.dataclass
class Output:
    """What a request's callback receives after each engine step that advanced it."""

    request_id: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    top_logprobs: list[dict[int, float]]
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort" (cancelled), "error" (a failed step)
    prompt_tokens: int
    completion_tokens: int
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None


@dataclasses.dataclass
class Result:
    """A whole request's outputs joined (`Engine.generate`)."""

    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str = ""
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[dict[int, float] | None] | None = None

    def add(self, out: Output) -> None:
        self.token_ids += out.token_ids
        self.text += out.text
        self.logprobs += out.logprobs
        self.top_logprobs += out.top_logprobs
        self.finished, self.finish_reason = out.finished, out.finish_reason
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
            self.prompt_top_logprobs = out.prompt_top_logprobs


def check_request(
    prompt_ids: list[int], params: SamplingParams, vocab_size: int, max_len: int
) -> list[int]:
    """The prompt as a list of ints, or a RequestError naming what to change."""
    prompt = [int(t) for t in prompt_ids]
    if not prompt:
        raise RequestError("the prompt is empty")
    bad = [t for t in prompt if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if params.max_tokens < 1:
        raise RequestError(f"max_tokens must be at least 1, got {params.max_tokens}")
    if len(prompt) + params.max_tokens > max_len:
        raise RequestError(
            f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
            f"the model's context of {max_len} tokens"
        )
    if not params.temperature >= 0:
        raise RequestError(f"temperature must be >= 0, got {params.temperature}")
    if not 0 < params.top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise RequestError(f"top_k must be >= 0, got {params.top_k}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and not 0 <= k <= TOP_LOGPROBS:
            raise RequestError(f"{name} must be between 0 and {TOP_LOGPROBS}, got {k}")
    return prompt


class Request:
    """One request's state while it waits, prefills and decodes."""

    def __init__(
        self,
        request_id: int,
        prompt: list[int],
        params: SamplingParams,
        callback: Callable[[Output], None] | None,
        stop_ids: frozenset[int],
        decode: Callable[[list[int]], str],
    ):
        self.id, self.prompt, self.params, self.callback = request_id, prompt, params, callback
        self.stop_ids, self.decode = stop_ids, decode
        self.slot: int | None = None
        self.cursor = 0  # prompt tokens prefilled so far
        self.tokens: list[int] = []  # generated, stop token excluded
        self.generated = 0  # generated, stop token included
        self.sent_tokens = self.sent_chars = 0
        self.logprobs: list[float] = []
        self.tops: list[dict[int, float]] = []
        self.prompt_lps: list[float | None] | None = None
        self.prompt_tops: list[dict[int, float] | None] | None = None
        self.done = False

    def add_prompt_logprobs(self, values: np.ndarray, top) -> None:
        if self.prompt_lps is None:
            self.prompt_lps, self.prompt_tops = [None], [None]
        self.prompt_lps += [float(v) for v in values]
        k = self.params.prompt_logprobs or 0
        for t in range(len(values)):
            row = {} if top is None else dict(zip(top[1][t, :k].tolist(), top[0][t, :k].tolist()))
            self.prompt_tops.append({int(i): float(v) for i, v in row.items()})

    def add_token(self, token: int, logprob: float, top, at_limit: bool) -> Output:
        """Records a generated token; returns the Output to report (finished or not)."""
        self.generated += 1
        reason = None
        if token in self.stop_ids:
            reason = "stop"
        else:
            self.tokens.append(token)
            self.logprobs.append(logprob)
            k = self.params.logprobs or 0
            self.tops.append({i: v for i, v in list((top or {}).items())[:k]})
        if reason is None and (self.generated >= self.params.max_tokens or at_limit):
            reason = "length"
        text, stopped = self._text(final=reason is not None)
        return self._output(text, stopped or reason)

    def finish(self, reason: str) -> Output:
        text, _ = self._text(final=True)
        return self._output(text, reason)

    def _text(self, final: bool) -> tuple[str, str | None]:
        """(new text to send, "stop" if a stop string ended the completion)."""
        full = self.decode(self.tokens)
        cut = [i for i in (full.find(s) for s in self.params.stop if s) if i >= 0]
        if cut:
            return full[self.sent_chars : max(min(cut), self.sent_chars)], "stop"
        end = len(full)
        if not final:
            while end > self.sent_chars and full[end - 1] == "\ufffd":
                end -= 1  # maybe the first bytes of a character the next token completes
            for s in self.params.stop:
                for n in range(min(len(s) - 1, end), 0, -1):
                    if full[end - n : end] == s[:n]:
                        end -= n
                        break
        end = max(end, self.sent_chars)
        return full[self.sent_chars : end], None

    def _output(self, text: str, reason: str | None) -> Output:
        self.sent_chars += len(text)
        new = slice(self.sent_tokens, len(self.tokens))
        self.sent_tokens = len(self.tokens)
        first = self.prompt_lps is not None and self.cursor == len(self.prompt)
        out = Output(
            request_id=self.id,
            token_ids=self.tokens[new],
            text=text,
            logprobs=self.logprobs[new] if self.params.logprobs is not None else [],
            top_logprobs=self.tops[new] if self.params.logprobs is not None else [],
            finished=reason is not None,
            finish_reason=reason,
            prompt_tokens=len(self.prompt),
            completion_tokens=self.generated,
            prompt_logprobs=self.prompt_lps if first else None,
            prompt_top_logprobs=self.prompt_tops if first else None,
        )
        if first:
            self.prompt_lps = self.prompt_tops = None  # sent once
        self.done = out.finished
        return out

    def callback_output(self, out: Output) -> None:
        if self.callback is not None:
            self.callback(out)
