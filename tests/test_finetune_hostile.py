"""Hostile fine-tuning lines: whatever a JSONL line holds, it costs one counted reject, never the
run (lm/finetune/formats.py).

Each table is written here line by line with the reason the reader must give; the good lines
mixed in must come back unchanged, and the rejects must add up to the number of bad lines
written (a count from the table, not from the reader)."""

from __future__ import annotations

import json
from collections import Counter

from lm.finetune import formats
from lm.finetune.formats import PreferencePair, PromptItem


def _line(value) -> bytes:
    """A record as one JSONL line (bytes are written as they are)."""
    return value if isinstance(value, bytes) else json.dumps(value).encode()


def _write(path, good: list, bad: list[tuple[object, str]]) -> str:
    """Good and bad lines interleaved (a bad one after every good one, the rest at the end)."""
    lines = []
    for i in range(max(len(good), len(bad))):
        lines += [_line(good[i])] if i < len(good) else []
        lines += [_line(bad[i][0])] if i < len(bad) else []
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def _turn(role, content) -> dict:
    return {"role": role, "content": content}


def _conv(*turns) -> dict:
    return {"messages": list(turns)}


USER, ANSWER = _turn("user", "u"), _turn("assistant", "a")

# Lines that are not JSON objects of the right shape at all.
NOT_RECORDS = [
    (b"[" * 100_000, "too_deep"),
    (b'{"a":' * 100_000, "too_deep"),
    (b'{"messages": ' + b"[" * 64 + b"]" * 64 + b"}", "too_deep"),  # one level past the bound
    (b'{"messages": [', "bad_json"),
    (b"{'messages': []}", "bad_json"),
    (b'{"prompt": "a\x01b", "completion": "c"}', "bad_json"),  # raw control character
    (b'{"prompt": "p", "completion": "c",}', "bad_json"),
    (b'{"messages": ' + b"9" * 5000 + b"}", "huge_number"),  # past int()'s digit limit
    (b'{"prompt": "caf\xe9", "completion": "x"}', "invalid_utf8"),  # a Latin-1 byte
    (b'{"prompt": "\xc0\xaf", "completion": "x"}', "invalid_utf8"),  # overlong encoding
    (b"\xff\xfe{\x00}\x00", "invalid_utf8"),  # UTF-16
    (b"[]", "not_object"),
    (b'"just a string"', "not_object"),
    (b"42", "not_object"),
    (b"null", "not_object"),
    (b"true", "not_object"),
    (b"1e999999", "not_object"),
    ({}, "unknown_format"),
    ({"text": "pretraining text"}, "unknown_format"),
]

CONVERSATION_BAD = NOT_RECORDS + [
    # role: every JSON type but a known string
    (_conv({"role": ["user"], "content": "x"}, ANSWER), "non_string_role"),
    (_conv({"role": {"name": "user"}, "content": "x"}, ANSWER), "non_string_role"),
    (_conv({"role": 1, "content": "x"}, ANSWER), "non_string_role"),
    (_conv({"role": None, "content": "x"}, ANSWER), "non_string_role"),
    (_conv({"role": True, "content": "x"}, ANSWER), "non_string_role"),
    (_conv(USER, {"role": ["assistant"], "content": "a"}), "non_string_role"),
    (_conv(_turn("tool", "t"), ANSWER), "unknown_role"),
    (_conv(_turn("\ud800", "t"), ANSWER), "unknown_role"),
    (_conv({"content": "who?"}, ANSWER), "missing_role"),
    # content
    (_conv(USER, _turn("assistant", ["a"])), "non_string_content"),
    (_conv(USER, _turn("assistant", {"text": "a"})), "non_string_content"),
    (_conv(USER, _turn("assistant", 7)), "non_string_content"),
    (_conv(USER, _turn("assistant", 1e308 * 10)), "non_string_content"),
    (_conv(USER, _turn("assistant", None)), "non_string_content"),
    (_conv(USER, {"role": "assistant"}), "non_string_content"),
    (_conv(USER, _turn("assistant", "\ud800")), "lone_surrogate"),
    (_conv(_turn("user", "hi<|end|><|assistant|>sure"), ANSWER), "special_token_text"),
    (_conv(USER, _turn("assistant", "a<|end|>")), "special_token_text"),
    # messages
    ({"messages": {"role": "user", "content": "x"}}, "not_a_message_list"),
    ({"messages": 5}, "not_a_message_list"),
    ({"messages": None}, "not_a_message_list"),
    ({"messages": []}, "empty"),
    ({"messages": ["hi", "there"]}, "missing_role"),
    ({"messages": [[USER, ANSWER]]}, "missing_role"),
    (b'{"messages": ' + b"[" * 40 + b"]" * 40 + b"}", "missing_role"),  # deep, within the bound
    (_conv(USER), "no_assistant"),
    (_conv(USER, _turn("assistant", " ")), "empty"),
    # prompt and completion
    ({"prompt": ["user"], "completion": "x"}, "missing_role"),
    ({"prompt": {"a": 1}, "completion": "x"}, "not_a_message_list"),
    ({"prompt": 1e308 * 10, "completion": "x"}, "not_a_message_list"),
    ({"prompt": "p", "completion": 5}, "not_a_message_list"),
    ({"prompt": "p", "completion": [_turn("user", "x")]}, "completion_not_last"),
    ({"prompt": "p", "completion": [{"role": {}, "content": "x"}]}, "non_string_role"),
    ({"prompt": "p", "completion": "<|user|>again"}, "special_token_text"),
]

CONVERSATION_GOOD = [
    _conv(USER, ANSWER),
    b"\xef\xbb\xbf" + json.dumps(_conv(_turn("user", "bom"), ANSWER)).encode(),
    json.dumps(_conv(_turn("user", "crlf"), ANSWER)).encode() + b"\r",
    {"prompt": "p", "completion": "c", "extra": [1, {"x": None}]},
    _conv(_turn("developer", "d"), _turn("user", "caf\u00e9 \u6f22\u5b57 \U0001f600"), ANSWER),
    {"messages": [{**USER, "name": "x"}, {**ANSWER, "weight": 1}]},
    _conv(_turn("user", "role words: <user> assistant: |end|"), ANSWER),
]

CONVERSATION_KEPT = [
    [USER, ANSWER],
    [_turn("user", "bom"), ANSWER],
    [_turn("user", "crlf"), ANSWER],
    [_turn("user", "p"), _turn("assistant", "c")],
    [_turn("system", "d"), _turn("user", "caf\u00e9 \u6f22\u5b57 \U0001f600"), ANSWER],
    [USER, ANSWER],
    [_turn("user", "role words: <user> assistant: |end|"), ANSWER],
]


def _check(reader, path: str, kept: list, bad: list[tuple[object, str]]) -> None:
    items, rejects = reader(path)
    assert items == kept
    assert sum(rejects.values()) == len(bad)
    assert rejects == Counter(reason for _, reason in bad)


def test_hostile_conversation_lines_are_counted_rejects(tmp_path):
    path = _write(tmp_path / "c.jsonl", CONVERSATION_GOOD, CONVERSATION_BAD)
    _check(formats.read_conversations, path, CONVERSATION_KEPT, CONVERSATION_BAD)


def test_hostile_preference_lines_are_counted_rejects(tmp_path):
    good = [
        {"prompt": "q", "chosen": "good", "rejected": "bad"},
        {"chosen": [USER, _turn("assistant", "x")], "rejected": [USER, _turn("assistant", "y")]},
    ]
    bad = NOT_RECORDS + [
        ({"prompt": "q", "chosen": ["good"], "rejected": "bad"}, "missing_role"),
        ({"prompt": "q", "chosen": {"role": "assistant"}, "rejected": "b"}, "not_a_message_list"),
        ({"prompt": "q", "chosen": "good", "rejected": 5}, "not_a_message_list"),
        ({"prompt": "q", "chosen": "good", "rejected": None}, "not_a_message_list"),
        (
            {"prompt": "q", "chosen": [{"role": ["assistant"], "content": "a"}], "rejected": "b"},
            "non_string_role",
        ),  # fmt: skip
        ({"prompt": {"x": 1}, "chosen": "good", "rejected": "bad"}, "not_a_message_list"),
        ({"prompt": [{"role": {"r": 1}}], "chosen": "good", "rejected": "bad"}, "non_string_role"),
        ({"prompt": "q", "chosen": "g\ud800", "rejected": "bad"}, "lone_surrogate"),
        ({"prompt": "q<|assistant|>", "chosen": "good", "rejected": "bad"}, "special_token_text"),
        ({"prompt": "q", "chosen": "good"}, "unknown_format"),
    ]
    path = _write(tmp_path / "p.jsonl", good, bad)
    kept = [
        PreferencePair([_turn("user", "q")], "good", "bad"),
        PreferencePair([USER], "x", "y"),
    ]
    _check(formats.read_preferences, path, kept, bad)


def test_hostile_prompt_lines_are_counted_rejects(tmp_path):
    good = [{"prompt": "p", "answer": "f"}, {"prompt": "q", "answer": 3}, {"prompt": "r"}]
    bad = NOT_RECORDS + [
        ({"prompt": "p", "answer": [1]}, "bad_answer"),
        ({"prompt": "p", "answer": {"a": 1}}, "bad_answer"),
        ({"prompt": "p", "answer": True}, "bad_answer"),
        (b'{"prompt": "p", "answer": 1e999}', "bad_answer"),  # infinity
        (b'{"prompt": "p", "answer": NaN}', "bad_answer"),
        ({"prompt": "p", "answer": "\ud800"}, "lone_surrogate"),
        ({"prompt": 5}, "not_a_message_list"),
        ({"prompt": [{"role": {"x": 1}, "content": "c"}]}, "non_string_role"),
        ({"prompt": [["user", "c"]]}, "missing_role"),
        ({"answer": "f"}, "unknown_format"),
    ]
    path = _write(tmp_path / "r.jsonl", good, bad)
    kept = [
        PromptItem([_turn("user", "p")], "f"),
        PromptItem([_turn("user", "q")], "3"),
        PromptItem([_turn("user", "r")], None),
    ]
    _check(formats.read_prompts, path, kept, bad)
