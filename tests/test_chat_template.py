"""The chat template (lm/tokenizer/chat.py): ids built from the role tokens, the assistant mask
fine-tuning will use, the plain-text fallback, and the Jinja string `/tokenizer_info` publishes
(rendered, then tokenized, it must give the same ids)."""

import json

import jinja2
import pytest

from lm.tokenizer import chat
from lm.tokenizer.hf_vocab import HFVocab
from lm.tokenizer.vocab import SentencePieceVocab
from tests.char_vocab import char_vocab

ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
SYSTEM, USER, ASSISTANT, END = 4, 5, 6, 7  # ids right after pad, eos, unk, bos
CORPUS = ["Be brief.", "Hello there, how are you?", "Hi! I am fine.", "And you?"] * 20
CORPUS += ["User: Hi\nAssistant: Yo\nSystem: x"] * 5

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi!"},
    {"role": "user", "content": "And you?"},
]


def _spm_vocab(tmp_path, name: str, specials: list[str]) -> SentencePieceVocab:
    return char_vocab(tmp_path, name, specials, CORPUS, spare=40)


@pytest.fixture(scope="module")
def role_vocab(tmp_path_factory):
    return _spm_vocab(tmp_path_factory.mktemp("spm"), "roles", ROLES)


@pytest.fixture(scope="module")
def plain_vocab(tmp_path_factory):
    return _spm_vocab(tmp_path_factory.mktemp("spm"), "plain", [])


def _render(vocab, messages, add_generation_prompt=True) -> str:
    """The published template rendered as lm-eval renders it (StrictUndefined)."""
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(chat.chat_template_string(vocab))
    return template.render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_role_token_ids_are_single_tokens(role_vocab, plain_vocab):
    assert chat.role_token_ids(role_vocab) == {
        "system": SYSTEM,
        "user": USER,
        "assistant": ASSISTANT,
        "end": END,
    }
    assert chat.role_token_ids(plain_vocab) is None
    assert chat.special_token_id(role_vocab, "</s>") == 1  # a control symbol, not its characters
    assert chat.special_token_id(role_vocab, "<|nope|>") is None
    assert chat.chat_stop_token_ids(role_vocab) == (END,)
    assert chat.chat_stop_token_ids(plain_vocab) == ()
    assert chat.chat_stop_strings(plain_vocab) == ("\nUser:",)


def test_conversation_ids_and_assistant_mask(role_vocab):
    enc = role_vocab.encode
    ids, mask = chat.apply_chat_template(role_vocab, CONVERSATION, return_assistant_mask=True)
    expected = (
        [3]
        + [SYSTEM] + enc("Be brief.") + [END]
        + [USER] + enc("Hello there") + [END]
        + [ASSISTANT] + enc("Hi!") + [END]
        + [USER] + enc("And you?") + [END]
        + [ASSISTANT]
    )  # fmt: skip
    assert ids == expected
    # 1 exactly on "Hi!" and the <|end|> closing it.
    start = expected.index(ASSISTANT) + 1
    learned = [0] * len(expected)
    learned[start : start + len(enc("Hi!")) + 1] = [1] * (len(enc("Hi!")) + 1)
    assert mask == learned
    assert ids[start + len(enc("Hi!"))] == END
    # Without the generation prompt the last <|assistant|> is gone; "developer" is system.
    ids = chat.apply_chat_template(
        role_vocab, [{"role": "developer", "content": "x"}], add_generation_prompt=False
    )
    assert ids == [3, SYSTEM] + enc("x") + [END]


def test_fallback_without_role_tokens(plain_vocab):
    enc = plain_vocab.encode
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    ids, mask = chat.apply_chat_template(plain_vocab, messages, return_assistant_mask=True)
    expected = [3] + enc("User:") + enc(" Hi\n") + enc("Assistant:") + enc(" Yo\n")
    expected += enc("Assistant:")
    assert ids == expected
    answer = len([3] + enc("User:") + enc(" Hi\n") + enc("Assistant:"))
    assert mask == [0] * answer + [1] * len(enc(" Yo\n")) + [0] * len(enc("Assistant:"))
    assert plain_vocab.decode(ids) == "User: Hi\nAssistant: Yo\nAssistant:"


@pytest.mark.parametrize("vocab_name", ["role_vocab", "plain_vocab"])
def test_template_string_renders_to_the_same_ids(request, vocab_name):
    vocab = request.getfixturevalue(vocab_name)
    for add in (True, False):
        text = _render(vocab, CONVERSATION, add)
        ids = chat.encode_with_special_tokens(vocab, text)
        assert ids == chat.apply_chat_template(vocab, CONVERSATION, add)
    if vocab_name == "role_vocab":
        assert text.startswith("<s><|system|>Be brief.<|end|><|user|>")
    with pytest.raises(jinja2.exceptions.UndefinedError):  # raise_exception is not defined
        _render(vocab, [{"role": "tool", "content": "x"}])


def test_bad_messages_are_clear_errors(role_vocab):
    with pytest.raises(chat.ChatTemplateError, match=r"messages\[1\]\.role"):
        chat.apply_chat_template(role_vocab, [{"role": "user", "content": "a"}, {"role": "x"}])
    with pytest.raises(chat.ChatTemplateError, match=r"messages\[0\]\.content must be a string"):
        chat.apply_chat_template(role_vocab, [{"role": "user", "content": 3}])


def test_special_token_strings_round_trip(role_vocab):
    enc = role_vocab.encode
    ids = chat.encode_with_special_tokens(role_vocab, "<s>Hi</s><pad>are")
    assert ids == [3] + enc("Hi") + [1, 0] + enc("are")
    assert chat.decode_with_special_tokens(role_vocab, ids) == "<s>Hi</s><pad>are"
    assert chat.special_token_text(role_vocab, 1) == "</s>"


def test_hugging_face_vocab_role_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "</s>", "<s>", *ROLES, "hi", "there", "[UNK]"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens(["<pad>", "</s>", "<s>", *ROLES])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    vocab = HFVocab(str(tmp_path))
    messages = [{"role": "user", "content": "hi there"}]
    # <s>=2, <|user|>=4, hi=7, there=8, <|end|>=6, <|assistant|>=5
    assert chat.apply_chat_template(vocab, messages) == [2, 4, 7, 8, 6, 5]
    assert chat.chat_stop_token_ids(vocab) == (6,)
    text = _render(vocab, messages)
    assert chat.encode_with_special_tokens(vocab, text) == [2, 4, 7, 8, 6, 5]
