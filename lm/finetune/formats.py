"""Reading the fine-tuning data users bring: JSONL files of conversations, preference pairs and
RL prompts (local or gs:// paths; a path may be a glob or a comma-separated list).

Why one reader with counted rejects: fine-tuning files come from many tools and are often a
little broken (a truncated last line, a Latin-1 byte, a `"\\ud800"` escape that JSON accepts but
UTF-8 cannot encode, a "tool" turn). A bad record is skipped and its reason counted, so a run
says what it dropped instead of failing halfway through tokenization; only a file that gives
nothing at all (or is missing) is an error.

Why every field is type-checked before use: a reader that trusts JSON types dies on the first
hostile line (`"role": ["user"]` is unhashable, `[` nested 100,000 deep overflows the
recursion limit), and one bad line must cost one record, whatever its JSON. Lines are parsed
with `lm.jsonio.loads` (bounded depth) and every field (messages, role, content, prompt,
completion, chosen, rejected, answer) is checked for its type before it is read.

Accepted records, one JSON object per line:

- conversations: OpenAI `{"messages": [{"role", "content"}, ...]}` (system | developer | user |
  assistant, any number of turns), or `{"prompt": ..., "completion": ...}`;
- preferences (TRL / Anthropic-HH style): `{"prompt": ..., "chosen": ..., "rejected": ...}`;
- prompts (RL): `{"prompt": ..., "answer": optional}`;

where a prompt is a string (one user turn) or a message list, and a completion (chosen,
rejected) is a string or a message list whose LAST message is the assistant's answer; messages
before it extend the prompt (and must be the same in chosen and rejected). Without "prompt",
chosen and rejected are whole conversations sharing everything but their last message.
"""

from __future__ import annotations

import glob
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass

from lm import jsonio, storage
from lm.errors import DataError

ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}
# The chat template's role tokens: SentencePiece matches them inside plain text, so content that
# spells one would turn into a real role token (a turn boundary the record did not have).
SPECIAL_TEXTS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
EXPECTED = {
    "conversations": '{"messages": [{"role", "content"}, ...]} or {"prompt", "completion"}',
    "preferences": '{"prompt", "chosen", "rejected"}',
    "prompts": '{"prompt", "answer"?}',
}


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages) with a preferred and a dispreferred assistant answer."""

    prompt: list[dict]
    chosen: str
    rejected: str


@dataclass(frozen=True)
class PromptItem:
    """An RL prompt (messages) and, for verifiable rewards, the expected answer."""

    prompt: list[dict]
    answer: str | None = None


class Reject(Exception):
    """A record that cannot be used; `reason` is the counted key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# -- paths and lines -------------------------------------------------------------------------


def expand_paths(spec: str) -> list[str]:
    """Comma-separated files or globs -> the files, in order; a missing one is a DataError."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if any(ch in item for ch in "*?["):
            if storage.is_remote(item):
                parent, pattern = item.rsplit("/", 1)
                found = sorted(os.fspath(p) for p in storage.path(parent).glob(pattern))
            else:
                found = sorted(glob.glob(item))
            if not found:
                raise DataError(f"no data file matches {item!r}")
            out.extend(found)
        elif not storage.exists(item):
            raise DataError(f"data file {item!r} does not exist")
        elif storage.isdir(item):
            raise DataError(f"data path {item!r} is a directory: name the .jsonl file(s)")
        else:
            out.append(item)
    if not out:
        raise DataError("no data file given: set a .jsonl path (or stdlib:<kind>)")
    return out


def _parse_line(raw: bytes):
    """One line's JSON value; a Reject naming why it is not JSON."""
    try:
        line = raw.decode("utf-8").lstrip("\ufeff")  # a byte-order mark is not data
    except UnicodeDecodeError:
        raise Reject("invalid_utf8") from None
    try:
        return jsonio.loads(line)
    except jsonio.JSONError as e:
        raise Reject("too_deep" if "nested deeper" in str(e) else "bad_json") from None
    except ValueError:  # an integer past Python's digit limit for int(str)
        raise Reject("huge_number") from None


def _records(spec: str, rejects: Counter):
    """Yields each line's JSON value; lines that are not JSON are counted in `rejects`. Bytes
    are decoded per line so one bad byte costs one record, not the file."""
    for path in expand_paths(spec):
        for raw in storage.read_bytes(path).split(b"\n"):
            if not raw.strip():
                continue
            try:
                yield _parse_line(raw)
            except Reject as e:
                rejects[e.reason] += 1


# -- fields ----------------------------------------------------------------------------------


def _text(value) -> str:
    """A string field's value; a Reject for non-strings, lone surrogates and role tokens."""
    if not isinstance(value, str):
        raise Reject("non_string_content")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Reject("lone_surrogate") from None
    if any(s in value for s in SPECIAL_TEXTS):
        raise Reject("special_token_text")
    return value


def _messages(value) -> list[dict]:
    """A message list normalized to [{"role", "content"}] with canonical role names."""
    if isinstance(value, str):
        return [{"role": "user", "content": _text(value)}]
    if not isinstance(value, list):
        raise Reject("not_a_message_list")
    if not value:
        raise Reject("empty")
    return [_message(message) for message in value]


def _message(message) -> dict:
    """One {"role", "content"} message with its role checked to be a known string."""
    if not isinstance(message, dict) or "role" not in message:
        raise Reject("missing_role")
    role = message["role"]
    if not isinstance(role, str):  # a list or object would not even be hashable
        raise Reject("non_string_role")
    role = ROLE_ALIASES.get(role, role)
    if role not in ROLES:
        raise Reject("unknown_role")
    return {"role": role, "content": _text(message.get("content"))}


def _completion(value) -> tuple[list[dict], str]:
    """(messages that extend the prompt, the answer) of a chosen / rejected / completion."""
    if isinstance(value, str):
        answer = _text(value)
        context: list[dict] = []
    else:
        messages = _messages(value)
        if messages[-1]["role"] != "assistant":
            raise Reject("completion_not_last")
        context, answer = messages[:-1], messages[-1]["content"]
    if not answer.strip():
        raise Reject("empty")
    return context, answer


def _object(record) -> dict:
    if not isinstance(record, dict):
        raise Reject("not_object")
    return record


# -- the three kinds of record ---------------------------------------------------------------


def parse_conversation(record) -> list[dict]:
    """One conversation record -> its messages (at least one non-empty assistant turn)."""
    record = _object(record)
    if "messages" in record:
        messages = _messages(record["messages"])
    elif "prompt" in record and "completion" in record:
        context, answer = _completion(record["completion"])
        messages = _messages(record["prompt"]) + context
        messages.append({"role": "assistant", "content": answer})
    else:
        raise Reject("unknown_format")
    assistant = [m["content"] for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise Reject("no_assistant")
    if not any(text.strip() for text in assistant):
        raise Reject("empty")
    return messages


def parse_preference(record) -> PreferencePair:
    """One preference record -> a PreferencePair (chosen and rejected on the same prompt)."""
    record = _object(record)
    if "chosen" not in record or "rejected" not in record:
        raise Reject("unknown_format")
    chosen_context, chosen = _completion(record["chosen"])
    rejected_context, rejected = _completion(record["rejected"])
    if chosen_context != rejected_context:
        raise Reject("prompt_mismatch")
    prompt = _messages(record["prompt"]) if "prompt" in record else []
    # Histories that already start with the prompt (some exports repeat it) are not doubled.
    prompt = chosen_context if chosen_context[: len(prompt)] == prompt else prompt + chosen_context
    if not prompt:
        raise Reject("empty")
    if chosen == rejected:
        raise Reject("identical")
    return PreferencePair(prompt=prompt, chosen=chosen, rejected=rejected)


def parse_prompt(record) -> PromptItem:
    """One RL prompt record -> a PromptItem (a numeric answer becomes its text)."""
    record = _object(record)
    if "prompt" not in record:
        raise Reject("unknown_format")
    prompt = _messages(record["prompt"])
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, str | int | float | type(None)):
        raise Reject("bad_answer")
    if isinstance(answer, float) and not math.isfinite(answer):  # 1e999, NaN, Infinity
        raise Reject("bad_answer")
    if isinstance(answer, int | float):
        answer = str(answer)
    return PromptItem(prompt=prompt, answer=None if answer is None else _text(answer))


def _read(spec: str, parse, kind: str) -> tuple[list, Counter]:
    """Every record of `spec` through `parse`; a DataError when none is usable."""
    rejects: Counter = Counter()
    items = []
    for record in _records(spec, rejects):
        try:
            items.append(parse(record))
        except Reject as e:
            rejects[e.reason] += 1
    if not items:
        if not rejects:
            raise DataError(f"{spec}: no records (expected one JSON object per line)")
        counts = ", ".join(f"{k}={v}" for k, v in sorted(rejects.items()))
        raise DataError(
            f"{spec}: all {sum(rejects.values())} records rejected ({counts}); "
            f"expected {kind} records {EXPECTED[kind]} per line"
        )
    if rejects:
        logging.info("%s: kept %d %s, rejected %s", spec, len(items), kind, dict(rejects))
    return items, rejects


def read_conversations(path: str) -> tuple[list[list[dict]], Counter]:
    """Conversations of a JSONL spec: ([[{"role", "content"}, ...], ...], reject counts)."""
    return _read(path, parse_conversation, "conversations")


def read_preferences(path: str) -> tuple[list[PreferencePair], Counter]:
    """Preference pairs of a JSONL spec: ([PreferencePair, ...], reject counts)."""
    return _read(path, parse_preference, "preferences")


def read_prompts(path: str) -> tuple[list[PromptItem], Counter]:
    """RL prompts of a JSONL spec: ([PromptItem, ...], reject counts)."""
    return _read(path, parse_prompt, "prompts")
