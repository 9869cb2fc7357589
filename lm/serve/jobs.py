"""One API call's engine requests (a `Job`): submit them, carry their outputs from the engine
thread to the event loop, and write them as OpenAI chunks or a whole response (tokens in
logprobs written by `TokenStrings`).

Why one queue per call: the engine thread may only hand work over (`call_soon_threadsafe`);
with every choice's outputs on one asyncio queue, a stream interleaves the choices in the order
the engine produced them and a plain response just waits for all of them to finish.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
import uuid
from collections.abc import AsyncIterator

from lm.tokenizer.chat import special_token_text


class EngineStopped(RuntimeError):
    """The engine's thread is gone while a call still waits for outputs."""


@dataclasses.dataclass
class JobChoice:
    """One choice (prompt x n) of a call and what it has produced so far."""

    index: int
    prompt: list[int]
    echo_text: str | None = None  # completions' echo: the prompt's text, put before the output
    hidden: int = 0  # leading prompt tokens echo leaves out (the start id added to a text prompt)
    request_id: int | None = None
    submitted: float = 0.0
    started: bool = False
    finished: bool = False
    finish_reason: str | None = None
    completion_tokens: int = 0
    offset: int = 0  # text_offset of the next token
    text: list[str] = dataclasses.field(default_factory=list)
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float | None] = dataclasses.field(default_factory=list)
    tops: list[dict[int, float] | None] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Delta:
    """What one engine Output adds to a choice (echo included on the first)."""

    text: str
    token_ids: list[int]
    logprobs: list[float | None]
    tops: list[dict[int, float] | None]
    finish_reason: str | None


def _reason(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


class Job:
    """The engine requests of one call: `kind` is "completion" or "chat"."""

    def __init__(self, engine, loop, metrics, strings, *, kind, model, include_usage, logprobs):
        self.engine, self.loop, self.metrics, self.strings = engine, loop, metrics, strings
        self.kind, self.model, self.include_usage = kind, model, include_usage
        self.logprobs = logprobs  # None: none; k: each token's logprob and top-k
        self.id = ("cmpl-" if kind == "completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.choices: list[JobChoice] = []
        self.prompt_tokens = 0
        self.queue: asyncio.Queue = asyncio.Queue()

    # -- the engine side -------------------------------------------------------------------

    def submit(self, choices: list[JobChoice], params: list) -> None:
        """Submits every choice; on an error cancels those already submitted and re-raises."""
        try:
            for choice, sampling in zip(choices, params):
                choice.submitted = time.monotonic()
                choice.request_id = self.engine.submit(
                    choice.prompt, sampling, self._callback(choice)
                )
                self.choices.append(choice)
        except Exception:
            self.cancel()
            raise

    def _callback(self, choice: JobChoice):
        def on_output(out) -> None:  # on the engine thread: hand over, nothing more
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (choice, out))
            except RuntimeError:  # the loop has closed (the server stopped)
                pass

        return on_output

    def cancel(self) -> None:
        """Frees the slots of every choice still running."""
        for choice in self.choices:
            if not choice.finished and choice.request_id is not None:
                self.engine.cancel(choice.request_id)

    # -- the loop side ---------------------------------------------------------------------

    def _delta(self, choice: JobChoice, out) -> Delta:
        if not choice.started and out.finish_reason != "abort":  # prefill's first token
            self.metrics.observe_first_token(time.monotonic() - choice.submitted)
        self.metrics.observe_tokens(max(out.completion_tokens - choice.completion_tokens, 0))
        choice.completion_tokens = out.completion_tokens
        text, ids = out.text, list(out.token_ids)
        lps, tops = list(out.logprobs), list(out.top_logprobs)
        if not choice.started and choice.echo_text is not None:
            echoed = choice.prompt[choice.hidden :]
            text = choice.echo_text + text
            if self.logprobs is not None:
                n = len(choice.prompt)
                prompt_lps = out.prompt_logprobs or [None] * n
                prompt_tops = out.prompt_top_logprobs or [None] * n
                lps = list(prompt_lps[choice.hidden :]) + lps
                tops = list(prompt_tops[choice.hidden :]) + tops
            ids = echoed + ids
        choice.started = True
        if out.finished:
            choice.finished, choice.finish_reason = True, _reason(out.finish_reason)
        return Delta(text, ids, lps, tops, choice.finish_reason if out.finished else None)

    async def deltas(self, poll_s: float = 1.0) -> AsyncIterator[tuple[JobChoice, Delta]]:
        """(choice, delta) for every engine output, until every choice has finished; raises
        EngineStopped if the engine's thread dies meanwhile (rather than waiting forever)."""
        getter = None
        try:
            while any(not c.finished for c in self.choices):
                if getter is None:
                    getter = asyncio.ensure_future(self.queue.get())
                done, _ = await asyncio.wait({getter}, timeout=poll_s)
                if not done:
                    if not self.engine.running:
                        raise EngineStopped("the engine stopped; the request cannot finish")
                    continue
                (choice, out), getter = getter.result(), None
                if out.finish_reason == "error":  # a failed engine step (logged there)
                    raise EngineStopped("the engine failed while running the request")
                yield choice, self._delta(choice, out)
        finally:
            if getter is not None:
                getter.cancel()

    async def run(self) -> None:
        """Collects every choice's deltas (for a whole, non-streamed response)."""
        async for choice, delta in self.deltas():
            choice.text.append(delta.text)
            choice.token_ids += delta.token_ids
            choice.logprobs += delta.logprobs
            choice.tops += delta.tops

    def usage(self) -> dict:
        completion = sum(c.completion_tokens for c in self.choices)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    # -- writing ---------------------------------------------------------------------------

    def _completion_logprobs(self, choice: JobChoice, delta: Delta) -> dict | None:
        if self.logprobs is None:
            return None
        out, choice.offset = completion_logprobs(
            self.strings, delta.token_ids, delta.logprobs, delta.tops, choice.offset
        )
        return out

    def _chat_logprobs(self, delta: Delta) -> dict | None:
        if self.logprobs is None:
            return None
        content = chat_logprobs(self.strings, delta.token_ids, delta.logprobs, delta.tops)
        return {"content": content}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        kind = "text_completion" if self.kind == "completion" else "chat.completion.chunk"
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model}
        out["choices"] = choices
        if self.include_usage:
            out["usage"] = usage
        return out

    def opening_chunks(self) -> list[dict]:
        """Chat streams open with each choice's role, as OpenAI's do."""
        if self.kind != "chat":
            return []
        delta = {"role": "assistant", "content": ""}
        entry = {"delta": delta, "logprobs": None, "finish_reason": None}
        return [self.chunk([{"index": c.index, **entry}]) for c in self.choices]

    def completion_chunks(self, choice: JobChoice, delta: Delta) -> list[dict]:
        scored = self.logprobs is not None and delta.token_ids
        if not (delta.text or delta.finish_reason or scored):
            return []
        logprobs = self._completion_logprobs(choice, delta)
        entry = {"index": choice.index, "text": delta.text, "logprobs": logprobs}
        return [self.chunk([{**entry, "finish_reason": delta.finish_reason}])]

    def chat_chunks(self, choice: JobChoice, delta: Delta) -> list[dict]:
        out = []
        if delta.text or (self.logprobs is not None and delta.token_ids):
            entry = {"index": choice.index, "delta": {"content": delta.text}}
            entry |= {"logprobs": self._chat_logprobs(delta), "finish_reason": None}
            out.append(self.chunk([entry]))
        if delta.finish_reason:
            entry = {"index": choice.index, "delta": {}, "logprobs": None}
            out.append(self.chunk([{**entry, "finish_reason": delta.finish_reason}]))
        return out

    def _whole(self, choice: JobChoice) -> Delta:
        return Delta("".join(choice.text), choice.token_ids, choice.logprobs, choice.tops, None)

    def completion_response(self) -> dict:
        choices = []
        for c in sorted(self.choices, key=lambda c: c.index):
            whole = self._whole(c)
            logprobs = self._completion_logprobs(c, whole)
            entry = {"index": c.index, "text": whole.text, "logprobs": logprobs}
            choices.append({**entry, "finish_reason": c.finish_reason})
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }

    def chat_response(self) -> dict:
        choices = []
        for c in sorted(self.choices, key=lambda c: c.index):
            whole = self._whole(c)
            message = {"role": "assistant", "content": whole.text}
            entry = {"index": c.index, "message": message, "logprobs": self._chat_logprobs(whole)}
            choices.append({**entry, "finish_reason": c.finish_reason})
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenStrings:
    """Token id -> (text, UTF-8 bytes), the `token`/`bytes` of OpenAI's logprobs.

    A byte-fallback piece (`<0xE2>`) is its single byte, written "bytes:\\xe2" like OpenAI
    writes a partial character; a special token (`</s>`, `<|end|>`) is its own string."""

    def __init__(self, vocab):
        self._vocab = vocab
        self._cache: dict[int, tuple[str, bytes]] = {}

    def _compute(self, token_id: int) -> tuple[str, bytes]:
        piece = special_token_text(self._vocab, token_id) or ""
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            raw = bytes([int(byte.group(1), 16)])
            text = raw.decode("utf-8", "ignore")
            text = text or "bytes:" + raw.decode("utf-8", "backslashreplace")
            return text, raw
        text = self._vocab.decode([token_id]) or piece
        return text, text.encode("utf-8")

    def lookup(self, token_id: int) -> tuple[str, bytes]:
        token_id = int(token_id)
        if token_id not in self._cache:
            self._cache[token_id] = self._compute(token_id)
        return self._cache[token_id]

    def text(self, token_id: int) -> str:
        return self.lookup(token_id)[0]

    def byte_values(self, token_id: int) -> list[int]:
        return list(self.lookup(token_id)[1])


LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token the model all but rules out


def _finite(logprob: float | None) -> float | None:
    return None if logprob is None else max(float(logprob), LOGPROB_FLOOR)


def _top_by_text(strings: TokenStrings, top: dict[int, float] | None) -> dict[str, float] | None:
    """{token id: logprob} as {token text: logprob}; ids that share a text keep the best."""
    if top is None:
        return None
    out: dict[str, float] = {}
    for token_id, logprob in sorted(top.items(), key=lambda kv: -kv[1]):
        out.setdefault(strings.text(token_id), _finite(logprob))
    return out


def completion_logprobs(
    strings: TokenStrings,
    token_ids: list[int],
    logprobs: list[float | None],
    tops: list[dict[int, float] | None],
    offset: int,
) -> tuple[dict, int]:
    """Completions' `logprobs` object for these tokens, and the text offset after them.

    `text_offset` counts characters of the token texts from `offset` (the texts of whole
    characters add up to the choice's text; a byte-fallback token counts as its written form)."""
    tokens = [strings.text(t) for t in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    out = {
        "tokens": tokens,
        "token_logprobs": [_finite(v) for v in logprobs],
        "top_logprobs": [_top_by_text(strings, top) for top in tops],
        "text_offset": offsets,
    }
    return out, offset


def chat_logprobs(
    strings: TokenStrings,
    token_ids: list[int],
    logprobs: list[float | None],
    tops: list[dict[int, float] | None],
) -> list[dict]:
    """Chat's `logprobs.content`: per token {token, logprob, bytes, top_logprobs: [...]}."""

    def entry(token_id: int, logprob: float | None) -> dict:
        text, raw = strings.lookup(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": list(raw)}

    out = []
    for token_id, logprob, top in zip(token_ids, logprobs, tops):
        ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
        alternatives = [entry(i, v) for i, v in ranked]
        out.append({**entry(token_id, logprob), "top_logprobs": alternatives})
    return out
