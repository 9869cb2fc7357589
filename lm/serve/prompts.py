"""Prompts as token ids, built off the event loop, after a bound that refuses a prompt too long
for the context without tokenizing it.

Why off the loop: tokenizing is CPU work that grows with the text (SentencePiece takes ~1 s for
4 MB); on the event loop it stalls every other connection, /health included. It runs on a small
thread pool instead (SentencePiece releases the GIL while it encodes).

Why a bound first: a prompt that cannot fit the context should cost nothing. `CharBound` knows
the most characters one token of the vocabulary can stand for (its longest piece), so a text of
C characters is at least ceil(C / L) tokens; a prompt whose bound plus max_tokens passes the
context is refused before it is tokenized. The bound is only claimed where it is sound:

- SentencePiece with the identity normalizer and whitespace kept (this project's tokenizers):
  characters are neither merged nor removed before segmentation. Other normalizers (NFKC composes
  characters, extra whitespace is removed) would let one token stand for more: no bound.
- Byte fallback: an unknown character becomes byte tokens (at least one token a character).
  Without it, SentencePiece merges a run of unknown characters into ONE unk token of any length,
  so only characters that have a piece of their own are counted.
- Other vocabularies (Hugging Face tokenizers, whose unknown-word handling varies): no bound;
  the body-size limit bounds their work.

Special-token strings are never longer than the bound's L (user-defined pieces are counted in L),
so the bound holds for text that contains them too.
"""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import ThreadPoolExecutor

from lm.errors import LMError
from lm.serve.checks import RequestChecks
from lm.serve.protocol import APIError
from lm.tokenizer import chat

WORKERS = 2  # concurrent tokenizations; more requests wait their turn off the loop


class CharBound:
    """A lower bound on the tokens of a text, from its characters (see the module docstring);
    `chars_per_token` is None when the vocabulary admits none."""

    def __init__(self, vocab):
        self.chars_per_token: int | None = None
        self.known: frozenset[str] | None = None  # None: every character counts
        sp = getattr(vocab, "_sp", None)
        if sp is None:
            return
        try:
            from sentencepiece import sentencepiece_model_pb2
        except ImportError:  # protobuf missing: no way to read the normalizer
            return
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        norm = proto.normalizer_spec
        if norm.name != "identity" or norm.remove_extra_whitespaces or norm.normalization_rule_tsv:
            return
        kinds = proto.SentencePiece.Type
        texts = [
            piece.piece.replace("\u2581", " ")  # SentencePiece's space: one character
            for piece in proto.pieces
            if piece.type in (kinds.NORMAL, kinds.USER_DEFINED)
        ]
        if not texts:
            return
        self.chars_per_token = max(len(t) for t in texts)
        if not proto.trainer_spec.byte_fallback:
            self.known = frozenset(t for t in texts if len(t) == 1)

    def min_tokens(self, text: str) -> int:
        """At least this many tokens encode `text` (0 when there is no bound)."""
        if self.chars_per_token is None or not text:
            return 0
        chars = len(text)
        if self.known is not None:
            known = self.known
            chars = sum(1 for c in text if c in known)
        return math.ceil(chars / self.chars_per_token)


class Prompts:
    """Token ids of completions prompts, chats and /tokenize texts, built on a thread pool."""

    def __init__(self, engine, checks: RequestChecks):
        self.engine, self.vocab, self.checks = engine, engine.vocab, checks
        self.bound = CharBound(self.vocab)
        self._pool: ThreadPoolExecutor | None = None

    async def run(self, fn, *args):
        """`fn(*args)` on the pool; its exceptions (APIError included) propagate."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="lm-tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        """Stops the pool's threads (the app's lifespan ends); `run` starts a new one."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def _start(self) -> list[int]:
        return [] if self.engine.start_id is None else [self.engine.start_id]

    # -- run on the pool --------------------------------------------------------------------

    def completion(self, prompt, max_tokens: int) -> list[tuple[list[int], str | None]]:
        """(ids, text or None) per prompt of a completions request: a text gets the start id,
        token ids run as given; each must fit the context with `max_tokens`."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for item in prompt:
            if isinstance(item, str):
                bound = len(self._start()) + self.bound.min_tokens(item)
                self.checks.fits(bound, max_tokens, at_least=True)
                ids = self.engine.encode_prompt(item)
                out.append((ids, item))
            else:
                if not item:
                    raise APIError(400, "a token-id prompt must not be empty", "prompt")
                self.checks.ids(item, "prompt")
                ids = list(item)
                out.append((ids, None))
            self.checks.fits(len(ids), max_tokens)
        return out

    def chat(self, messages: list[dict], max_tokens: int | None) -> tuple[list[int], int]:
        """The chat template's ids and the max_tokens to run with (None: the rest of the
        context); 400 when they cannot fit."""
        bound = sum(self.bound.min_tokens(m["content"]) for m in messages)
        self.checks.fits(bound, 1 if max_tokens is None else max_tokens, at_least=True)
        ids = self.template(messages, True)
        max_tokens = self.checks.room(len(ids)) if max_tokens is None else max_tokens
        self.checks.fits(len(ids), max_tokens)
        return ids, max_tokens

    def template(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        try:
            return chat.apply_chat_template(self.vocab, messages, add_generation_prompt)
        except LMError as e:
            raise APIError(400, str(e), "messages") from None

    def text(self, text: str, add_start: bool) -> list[int]:
        """/tokenize of a text: special-token strings become their ids (as a Hugging Face
        tokenizer does); no context bound, since lm-eval counts whole documents this way."""
        ids = chat.encode_with_special_tokens(self.vocab, text)
        return (self._start() if add_start else []) + ids
