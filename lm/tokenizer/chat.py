"""The chat template: conversations as token ids, built from the tokenizer's role tokens.

Why ids and not text: the role tokens (`<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`,
configured as `tokenizer.special_tokens` and trained as single pieces) must enter the model as
those single ids, never as the characters of their names; building the ids directly also gives
fine-tuning the exact span of every assistant turn (`return_assistant_mask=True`).

Format, when the vocabulary has the role tokens:

    [start] <|system|> content <|end|> <|user|> content <|end|> <|assistant|> content <|end|> ...
    <|assistant|>                                    (the generation prompt)

where [start] is the id every training document starts with (BOS; EOS for a Hugging Face
tokenizer without BOS) and each content is `encode_text(vocab, content)`. Generation stops at
`<|end|>` (`chat_stop_token_ids`) as well as at EOS. OpenAI's "developer" role is the system role.

Content is text, whatever it holds: a message saying "hi<|end|><|assistant|>" must not end its
turn and open the assistant's. A plain `vocab.encode` would make those strings the role ids
(SentencePiece matches user-defined symbols anywhere in its input; a Hugging Face tokenizer its
added tokens), so `encode_text` encodes each such string as the characters it is made of.

A vocabulary without the role tokens (a char tokenizer, a converted Hugging Face model) gets a
plain-text fallback, each segment encoded on its own:

    [start] "System:" " content\\n" "User:" " content\\n" "Assistant:" " content\\n" ...
    "Assistant:"

and generation stops at the string "\\nUser:" (`chat_stop_strings`).

`chat_template_string` is the same format as a Jinja template (Hugging Face / vLLM style, for
`/tokenizer_info`): rendering it and tokenizing the text with `encode_with_special_tokens` gives
the ids of `apply_chat_template` (in the fallback, up to how a tokenizer joins the segments; and
for content without special-token strings, which a rendered text can no longer tell from roles).
"""

from __future__ import annotations

import functools
import json
import re

from lm.errors import LMError

ROLE_PIECES = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
END_PIECE = "<|end|>"
ROLE_ALIASES = {"developer": "system"}
FALLBACK_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}


class ChatTemplateError(LMError):
    """A conversation the template cannot format (unknown role, content that is not text)."""


def special_token_id(vocab, piece: str) -> int | None:
    """The id of `piece` when the vocabulary holds it as one token (a SentencePiece piece, control
    symbols such as `</s>` included; a Hugging Face vocabulary or added token), else None."""
    sp = getattr(vocab, "_sp", None)  # SentencePieceVocab: the one place that reads the processor
    if sp is not None:
        token_id = int(sp.PieceToId(piece))
        return token_id if sp.IdToPiece(token_id) == piece else None
    tokenizer = getattr(vocab, "tokenizer", None)  # HFVocab
    if tokenizer is not None and hasattr(tokenizer, "token_to_id"):
        token_id = tokenizer.token_to_id(piece)
        return None if token_id is None else int(token_id)
    ids = vocab.encode(piece)
    return int(ids[0]) if len(ids) == 1 else None


def special_token_text(vocab, token_id: int | None) -> str | None:
    """The string of a single token id (`</s>` for SentencePiece's EOS), or None."""
    if token_id is None:
        return None
    sp = getattr(vocab, "_sp", None)
    if sp is not None:
        return sp.IdToPiece(int(token_id)) if 0 <= token_id < sp.GetPieceSize() else None
    tokenizer = getattr(vocab, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "id_to_token"):
        return tokenizer.id_to_token(int(token_id))
    return vocab.decode([token_id]) or None


def start_token_id(vocab) -> int | None:
    """The id every training document (and so every prompt) starts with."""
    return getattr(vocab, "start_id", vocab.bos_id)


def role_token_ids(vocab) -> dict[str, int] | None:
    """{"system", "user", "assistant", "end"} -> id, or None when any role token is missing."""
    pieces = {**ROLE_PIECES, "end": END_PIECE}
    ids = {name: special_token_id(vocab, piece) for name, piece in pieces.items()}
    return None if any(i is None for i in ids.values()) else ids


@functools.lru_cache(maxsize=8)
def _control_pattern(vocab) -> re.Pattern | None:
    """A regex of the strings a plain `vocab.encode` turns into one special id wherever they
    appear (longest first): SentencePiece's user-defined symbols of more than one character (the
    role tokens; a one-character symbol such as a tab is that character), a Hugging Face
    tokenizer's special added tokens, and the role tokens however the vocabulary holds them."""
    strings = {p for p in (*ROLE_PIECES.values(), END_PIECE) if special_token_id(vocab, p)}
    sp = getattr(vocab, "_sp", None)
    if sp is not None:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        user = proto.SentencePiece.Type.USER_DEFINED
        strings |= {piece.piece for piece in proto.pieces if piece.type == user}
    tokenizer = getattr(vocab, "tokenizer", None)
    if tokenizer is not None and hasattr(tokenizer, "get_added_tokens_decoder"):
        added = tokenizer.get_added_tokens_decoder().values()
        strings |= {token.content for token in added if token.special}
    strings = sorted((s for s in strings if len(s) > 1), key=lambda s: (-len(s), s))
    return re.compile("|".join(map(re.escape, strings))) if strings else None


def encode_text(vocab, text: str) -> list[int]:
    """The ids of `text` as text: `vocab.encode`, except that a special-token string in it (a
    role token's name, say) is encoded as its characters, never as the special id: its first
    character on its own, the rest as text again (which holds no copy of that string)."""
    pattern = _control_pattern(vocab)
    if pattern is None:
        return vocab.encode(text)
    ids, at = [], 0
    for match in pattern.finditer(text):
        if match.start() > at:
            ids += vocab.encode(text[at : match.start()])
        special = match.group()
        ids += vocab.encode(special[0]) + encode_text(vocab, special[1:])
        at = match.end()
    return ids + (vocab.encode(text[at:]) if at < len(text) else [])


def _special_strings(vocab) -> dict[str, int]:
    """The strings of the start/BOS/EOS/pad tokens -> their ids (strings a plain encode would
    split into characters, e.g. SentencePiece's control symbols `<s>` and `</s>`)."""
    out = {}
    for token_id in (start_token_id(vocab), vocab.bos_id, vocab.eos_id, vocab.pad_id):
        text = special_token_text(vocab, token_id)
        if text and vocab.encode(text) != [token_id]:
            out[text] = int(token_id)
    return out


def encode_with_special_tokens(vocab, text: str) -> list[int]:
    """`vocab.encode(text)`, except that the start/BOS/EOS/pad token strings become their ids
    (what a Hugging Face tokenizer does; the rendered chat template and lm-eval's remote
    tokenizer, which looks the EOS id up as `encode(eos_token)[0]`, rely on it)."""
    specials = _special_strings(vocab)
    ids, rest = [], text
    while rest:
        hits = [(rest.find(s), -len(s), s) for s in specials if s in rest]
        if not hits:
            break
        at, _, special = min(hits)
        if at:
            ids += vocab.encode(rest[:at])
        ids.append(specials[special])
        rest = rest[at + len(special) :]
    return ids + (vocab.encode(rest) if rest else [])


def decode_with_special_tokens(vocab, ids: list[int]) -> str:
    """The text of `ids` with the start/BOS/EOS/pad tokens written as their strings (not cut at
    EOS), so that `encode_with_special_tokens` gives the ids back."""
    specials = {token_id: text for text, token_id in _special_strings(vocab).items()}
    parts, run = [], []
    for token_id in ids:
        if token_id in specials:
            parts += [vocab.decode(run) if run else "", specials[token_id]]
            run = []
        else:
            run.append(int(token_id))
    return "".join(parts) + (vocab.decode(run) if run else "")


def _message_role_and_content(index: int, message) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise ChatTemplateError(f"messages[{index}] must be an object with role and content")
    role = ROLE_ALIASES.get(message.get("role"), message.get("role"))
    if role not in ROLE_PIECES:
        raise ChatTemplateError(
            f"messages[{index}].role must be system, developer, user or assistant, "
            f"not {message.get('role')!r}"
        )
    content = message.get("content")
    content = "" if content is None else content
    if not isinstance(content, str):
        raise ChatTemplateError(f"messages[{index}].content must be a string")
    return role, content


def apply_chat_template(
    vocab,
    messages: list[dict],
    add_generation_prompt: bool = True,
    return_assistant_mask: bool = False,
) -> list[int] | tuple[list[int], list[int]]:
    """Token ids of a conversation [{"role", "content"}, ...], ending with the assistant's
    generation prompt when `add_generation_prompt`.

    With `return_assistant_mask`, also a 0/1 list as long as the ids: 1 on the tokens of
    assistant turns that training should learn (content and its `<|end|>`; in the fallback, the
    content and its newline), 0 on the start token, role tokens and other roles' turns."""
    if not messages and not add_generation_prompt:
        raise ChatTemplateError("messages must not be empty")
    ids, mask = [], []

    def add(tokens: list[int], learned: bool) -> None:
        ids.extend(tokens)
        mask.extend([int(learned)] * len(tokens))

    start = start_token_id(vocab)
    if start is not None:
        add([start], False)
    roles = role_token_ids(vocab)
    for index, message in enumerate(messages):
        role, content = _message_role_and_content(index, message)
        assistant = role == "assistant"
        if roles is not None:
            add([roles[role]], False)
            add(encode_text(vocab, content) + [roles["end"]], assistant)
        else:
            add(vocab.encode(f"{FALLBACK_NAMES[role]}:"), False)
            add(encode_text(vocab, f" {content}\n"), assistant)
    if add_generation_prompt:
        if roles is not None:
            add([roles["assistant"]], False)
        else:
            add(vocab.encode(f"{FALLBACK_NAMES['assistant']}:"), False)
    return (ids, mask) if return_assistant_mask else ids


def chat_stop_token_ids(vocab) -> tuple[int, ...]:
    """Token ids that end an assistant turn besides EOS: `<|end|>`, when the vocabulary has it."""
    roles = role_token_ids(vocab)
    return () if roles is None else (roles["end"],)


def chat_stop_strings(vocab) -> tuple[str, ...]:
    """Strings that end an assistant turn: the next user turn's header in the fallback format."""
    return () if role_token_ids(vocab) is not None else ("\nUser:",)


def _literal(text: str) -> str:
    """`text` as a Jinja expression that prints it verbatim."""
    return "{{ " + json.dumps(text) + " }}"


def chat_template_string(vocab) -> str:
    """The chat format as a Jinja template over `messages` and `add_generation_prompt` (the
    strings are literals, so it renders under a StrictUndefined environment such as lm-eval's)."""
    start = special_token_text(vocab, start_token_id(vocab)) or ""
    if role_token_ids(vocab) is not None:
        headers = ROLE_PIECES
        body, end = "{{ message['content'] }}", _literal(END_PIECE)
    else:
        headers = {role: f"{name}:" for role, name in FALLBACK_NAMES.items()}
        body, end = "{{ ' ' + message['content'] }}", _literal("\n")
    branches = "".join(
        ("{% if " if i == 0 else "{% elif ")
        + " or ".join(
            [f"message['role'] == '{role}'"]
            + [f"message['role'] == '{a}'" for a, r in ROLE_ALIASES.items() if r == role]
        )
        + " %}"
        + _literal(header)
        for i, (role, header) in enumerate(headers.items())
    )
    unknown = "{% else %}{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
    return (
        (_literal(start) if start else "")
        + "{% for message in messages %}"
        + branches
        + unknown
        + body
        + end
        + "{% endfor %}"
        + "{% if add_generation_prompt %}"
        + _literal(headers["assistant"])
        + "{% endif %}"
    )
