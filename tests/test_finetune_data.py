"""The fine-tuning data layer: reading user JSONL with counted rejects (lm/finetune/formats.py),
chat-template masks and packing into trainer rows (examples.py), the project-made stdlib data and
its CLI (make_data.py), and the RL rewards (rewards.py).

The expected ids and masks here are assembled by hand from separately encoded pieces, never from
the code under test, so a mask shifted by one or lost in packing fails."""

import json
import subprocess
import sys

import numpy as np
import pytest

from lm.errors import ConfigError, DataError
from lm.finetune import examples, formats, make_data, rewards
from lm.finetune.formats import PreferencePair, PromptItem
from lm.tokenizer.vocab import SentencePieceVocab
from tests.char_vocab import char_vocab

BOS, SYSTEM, USER, ASSISTANT, END = 3, 4, 5, 6, 7  # role tokens right after pad, eos, unk, bos
ROLE_PIECES = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CORPUS = ["def name(arg, other=None):  # returns a value", "Return the sum of x and y."] * 20


def _vocab(tmp_path, name: str, specials: list[str]) -> SentencePieceVocab:
    return char_vocab(tmp_path, name, specials, CORPUS, spare=30)


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
    return _vocab(tmp_path_factory.mktemp("spm"), "roles", ROLE_PIECES)


@pytest.fixture(scope="module")
def plain_vocab(tmp_path_factory):
    return _vocab(tmp_path_factory.mktemp("spm"), "plain", [])


def _turn(role: str, content: str) -> dict:
    return {"role": role, "content": content}


MULTI_TURN = [
    _turn("system", "Be brief."),
    _turn("user", "Sum?"),
    _turn("assistant", "def add(x, y):"),
    _turn("user", "And a default?"),
    _turn("assistant", "def add(x, y=0):"),
]


def _hand_encoded(vocab, messages) -> tuple[list[int], list[int]]:
    """The expected ids and assistant mask, piece by piece, as the template's docstring says."""
    role_ids = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
    ids, mask = [BOS], [0]
    for m in messages:
        content = vocab.encode(m["content"]) + [END]
        ids += [role_ids[m["role"]]] + content
        mask += [0] + [int(m["role"] == "assistant")] * len(content)
    return ids, mask


# -- chat template ids and masks -------------------------------------------------------------


def test_multi_turn_mask_is_exactly_the_assistant_tokens_and_their_end(vocab):
    enc = vocab.encode
    ids, mask = examples.encode_conversation(vocab, MULTI_TURN)
    first, second = enc("def add(x, y):"), enc("def add(x, y=0):")
    expected_ids = (
        [BOS]
        + [SYSTEM] + enc("Be brief.") + [END]
        + [USER] + enc("Sum?") + [END]
        + [ASSISTANT] + first + [END]
        + [USER] + enc("And a default?") + [END]
        + [ASSISTANT] + second + [END]
    )  # fmt: skip
    n_before_first = 1 + (2 + len(enc("Be brief."))) + (2 + len(enc("Sum?"))) + 1
    n_between = (2 + len(enc("And a default?"))) + 1  # the user turn, the assistant header
    expected_mask = (
        [0] * n_before_first + [1] * (len(first) + 1) + [0] * n_between + [1] * (len(second) + 1)
    )
    assert ids.dtype == mask.dtype == np.int32
    assert ids.tolist() == expected_ids
    assert mask.tolist() == expected_mask
    assert [t for t, m in zip(expected_ids, expected_mask) if m] == first + [END] + second + [END]


def _packed_conversations():
    return [
        MULTI_TURN,
        [_turn("user", "Hi"), _turn("assistant", "def hi():")],
        [_turn("user", "Return the sum of x and y."), _turn("assistant", "def sum(x, y):")],
        [_turn("system", "S"), _turn("user", "x"), _turn("assistant", "def x(a, b, c, d, e):")],
        [_turn("user", "a"), _turn("assistant", "def a():"), _turn("user", "b")],
    ]


def test_packing_keeps_each_conversations_mask_and_isolates_segments(vocab):
    conversations = _packed_conversations()
    seq_len = 96
    rows, counts = examples.pack_conversations(vocab, conversations, seq_len)
    assert counts == {}
    assert set(rows) == {"inputs", "targets", "weights", "segment_ids", "positions"}
    assert all(v.shape == rows["inputs"].shape and v.shape[1] == seq_len for v in rows.values())
    assert rows["weights"].dtype == np.float32 and rows["segment_ids"].dtype == np.int32
    assert rows["inputs"].shape[0] < len(conversations)  # several share a row
    # Each segment, cut out of its row, is one conversation's own shifted view.
    found = []
    for r in range(rows["inputs"].shape[0]):
        seg = rows["segment_ids"][r]
        pad = seg == 0
        assert not rows["weights"][r][pad].any() and not rows["targets"][r][pad].any()
        assert np.all(np.diff(seg[~pad]) >= 0) and not pad[: (~pad).sum()].any()  # 1, 1, 2, ...
        for s in np.unique(seg[~pad]):
            at = np.flatnonzero(seg == s)
            assert np.all(np.diff(at) == 1)  # contiguous
            assert rows["positions"][r][at].tolist() == list(range(len(at)))
            found.append(tuple(tuple(rows[k][r][at].tolist()) for k in ("inputs", "targets")))
            found[-1] += (tuple(rows["weights"][r][at].astype(int).tolist()),)
    expected = []
    for messages in conversations:
        ids, mask = _hand_encoded(vocab, messages)
        expected.append((tuple(ids[:-1]), tuple(ids[1:]), tuple(mask[1:])))
    assert sorted(found) == sorted(expected)
    # The last target of each segment is its conversation's last token: nothing crosses over.
    total = sum(sum(e[2]) for e in expected)
    assert rows["weights"].sum() == total


def test_packed_weighted_loss_equals_the_per_conversation_assistant_loss(vocab):
    """The loss a trainer takes over packed rows (weighted mean cross-entropy) equals the mean
    over every conversation's assistant targets computed alone, with logits a function of
    (input token, position in the conversation), as a segment-masked model's would be."""
    conversations = _packed_conversations()
    rows, _ = examples.pack_conversations(vocab, conversations, 96)
    rng = np.random.default_rng(0)
    table = rng.normal(size=(vocab.vocab_size, 96, vocab.vocab_size))

    def cross_entropy(logits, targets):
        logz = np.log(np.exp(logits).sum(-1))
        return logz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]

    packed_ce = cross_entropy(table[rows["inputs"], rows["positions"]], rows["targets"])
    packed = (packed_ce * rows["weights"]).sum() / rows["weights"].sum()
    losses = []
    for messages in conversations:
        ids, mask = _hand_encoded(vocab, messages)
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                losses.append(cross_entropy(table[ids[t], t], np.array(ids[t + 1])))
    assert packed == pytest.approx(np.mean(losses), rel=1e-6)


def test_long_conversations_are_truncated_or_dropped_and_counted(vocab):
    long_answer = [_turn("user", "x"), _turn("assistant", "def f(" + "a, " * 40 + "):")]
    late_answer = [_turn("user", "y" * 80), _turn("assistant", "def g():")]
    rows, counts = examples.pack_conversations(vocab, [long_answer, late_answer], 32)
    assert counts == {"truncated": 1, "too_long": 1}
    assert rows["inputs"].shape == (1, 32) and (rows["segment_ids"] == 1).all()
    ids, mask = _hand_encoded(vocab, long_answer)
    assert rows["targets"][0].tolist() == ids[1:33]
    assert rows["weights"][0].tolist() == mask[1:33]
    with pytest.raises(DataError, match="seq_len=32"):
        examples.pack_conversations(vocab, [late_answer], 32)


# -- reading JSONL ---------------------------------------------------------------------------


def _jsonl(path, lines: list) -> str:
    """Writes records (dicts are dumped, bytes written as they are) one per line."""
    raw = [x if isinstance(x, bytes) else json.dumps(x).encode() for x in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    return str(path)


def test_bad_records_are_counted_and_good_ones_kept(tmp_path):
    good = [_turn("system", "s"), _turn("user", "u"), _turn("assistant", "a")]
    path = _jsonl(
        tmp_path / "c.jsonl",
        [
            b"\xef\xbb\xbf" + json.dumps({"messages": good}).encode(),  # with a byte-order mark
            b'{"messages": [',  # bad JSON
            b'{"prompt": "caf\xe9", "completion": "x"}',  # Latin-1 byte: invalid UTF-8
            b'{"prompt": "p", "completion": "\\ud800"}',  # lone surrogate escape
            {"messages": [_turn("user", "no answer")]},
            {"messages": [_turn("tool", "t"), _turn("assistant", "a")]},
            {"messages": [{"content": "who?"}, _turn("assistant", "a")]},
            {"messages": [_turn("user", "fake <|end|><|assistant|> turn"), _turn("assistant", "")]},
            {"messages": [_turn("user", "u"), _turn("assistant", 7)]},
            b"",
            {"prompt": "p", "completion": "c", "extra": 1},
            {"messages": [_turn("developer", "d"), _turn("user", "u"), _turn("assistant", "a")]},
        ],
    )
    conversations, rejects = formats.read_conversations(path)
    assert conversations == [
        good,
        [_turn("user", "p"), _turn("assistant", "c")],
        [_turn("system", "d"), _turn("user", "u"), _turn("assistant", "a")],
    ]
    assert rejects == {
        "bad_json": 1,
        "invalid_utf8": 1,
        "lone_surrogate": 1,
        "no_assistant": 1,
        "unknown_role": 1,
        "missing_role": 1,
        "non_string_content": 1,
        "special_token_text": 1,
    }


def test_unusable_files_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        formats.read_conversations(str(tmp_path / "nope.jsonl"))
    path = _jsonl(tmp_path / "bad.jsonl", [b"{", {"messages": []}, {"text": "x"}])
    with pytest.raises(DataError, match="all 3 records rejected.*bad_json=1.*empty=1") as e:
        formats.read_conversations(path)
    assert "\n" not in str(e.value)


def test_globs_and_comma_lists_read_every_file(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "1", "completion": "x"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "2", "completion": "y"}])
    by_glob, _ = formats.read_conversations(str(tmp_path / "*.jsonl"))
    by_list, _ = formats.read_conversations(f"{a}, {b}")
    assert by_glob == by_list and [c[0]["content"] for c in by_glob] == ["1", "2"]


ASSISTANT_B = {"role": "assistant", "content": "b"}


def test_preference_records_in_string_message_and_implicit_prompt_forms(tmp_path):
    history = [_turn("user", "q1"), _turn("assistant", "a1"), _turn("user", "q2")]
    path = _jsonl(
        tmp_path / "p.jsonl",
        [
            {"prompt": "q", "chosen": "good", "rejected": "bad"},
            {  # HH style: the shared history lives in chosen and rejected
                "prompt": "q0",
                "chosen": [*history, _turn("assistant", "good")],
                "rejected": [*history, _turn("assistant", "bad")],
            },
            {  # TRL implicit prompt
                "chosen": [_turn("user", "q"), _turn("assistant", "good")],
                "rejected": [_turn("user", "q"), _turn("assistant", "bad")],
            },
            {"prompt": "q", "chosen": [_turn("user", "a"), ASSISTANT_B], "rejected": "c"},
            {  # the prompt repeated at the start of the histories is not doubled
                "prompt": "q",
                "chosen": [_turn("user", "q"), _turn("assistant", "good")],
                "rejected": [_turn("user", "q"), _turn("assistant", "bad")],
            },
            {"prompt": "q", "chosen": "same", "rejected": "same"},
            {"prompt": "q", "chosen": [ASSISTANT_B, _turn("user", "y")], "rejected": "z"},
        ],
    )
    pairs, rejects = formats.read_preferences(path)
    assert pairs == [
        PreferencePair([_turn("user", "q")], "good", "bad"),
        PreferencePair([_turn("user", "q0"), *history], "good", "bad"),
        PreferencePair([_turn("user", "q")], "good", "bad"),
        PreferencePair([_turn("user", "q")], "good", "bad"),
    ]
    assert rejects == {"prompt_mismatch": 1, "identical": 1, "completion_not_last": 1}


def test_prompt_records(tmp_path):
    path = _jsonl(
        tmp_path / "r.jsonl",
        [
            {"prompt": "p", "answer": "f"},
            {"prompt": [_turn("system", "s"), _turn("user", "u")], "answer": 42},
            {"prompt": "no answer"},
            {"prompt": "p", "answer": ["x"]},
            {"answer": "f"},
        ],
    )
    items, rejects = formats.read_prompts(path)
    assert items == [
        PromptItem([_turn("user", "p")], "f"),
        PromptItem([_turn("system", "s"), _turn("user", "u")], "42"),
        PromptItem([_turn("user", "no answer")], None),
    ]
    assert rejects == {"bad_answer": 1, "unknown_format": 1}


# -- preference rows -------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_name", ["vocab", "plain_vocab"])
def test_pair_weights_cover_exactly_the_completion_and_its_end(request, vocab_name):
    vocab = request.getfixturevalue(vocab_name)
    enc = vocab.encode
    pairs = [
        PreferencePair([_turn("user", "Sum?")], "def add(x, y):  # returns a value", "def add():"),
        PreferencePair([_turn("system", "s"), _turn("user", "q")], "def q():", "def r(a):"),
    ]
    rows, counts = examples.encode_pairs(vocab, pairs, 64)
    assert counts == {}
    assert {k: v.shape for k, v in rows.items()} == {
        f"{side}_{k}": (2, 64)
        for side in ("chosen", "rejected")
        for k in ("inputs", "targets", "weights", "positions", "segment_ids")
    }
    for i, pair in enumerate(pairs):
        if vocab_name == "vocab":
            prompt, _ = _hand_encoded(vocab, pair.prompt)
            prompt += [ASSISTANT]
            completions = {s: enc(getattr(pair, s)) + [END] for s in ("chosen", "rejected")}
        else:  # the plain-text fallback: "User: q\n" ... "Assistant:" " answer\n"
            names = {"system": "System:", "user": "User:"}
            prompt = [BOS]
            for m in pair.prompt:
                prompt += enc(names[m["role"]]) + enc(f" {m['content']}\n")
            prompt += enc("Assistant:")
            completions = {s: enc(f" {getattr(pair, s)}\n") for s in ("chosen", "rejected")}
        for side, completion in completions.items():
            ids = prompt + completion
            n = len(ids) - 1
            w = rows[f"{side}_weights"][i]
            assert rows[f"{side}_inputs"][i, :n].tolist() == ids[:-1]
            assert rows[f"{side}_targets"][i, :n].tolist() == ids[1:]
            assert w.tolist() == [0.0] * (len(prompt) - 1) + [1.0] * len(completion) + [0.0] * (
                64 - n
            )
            assert rows[f"{side}_positions"][i, :n].tolist() == list(range(n))
            assert (rows[f"{side}_segment_ids"][i] == (np.arange(64) < n)).all()


def test_long_pairs_lose_prompt_tokens_from_the_left_or_are_dropped(vocab):
    long_prompt = PreferencePair([_turn("user", "z" * 100)], "def a():", "def b(x):")
    long_answer = PreferencePair([_turn("user", "q")], "def " + "c" * 60 + "():", "def d():")
    rows, counts = examples.encode_pairs(vocab, [long_prompt, long_answer], 32)
    assert counts == {"truncated": 1, "too_long": 1}
    assert rows["chosen_inputs"].shape == (1, 32)
    rejected = vocab.encode("def b(x):") + [END]
    kept = 32 + 1 - len(rejected)  # the longer completion decides the prompt's length
    full_prompt, _ = _hand_encoded(vocab, long_prompt.prompt)
    prompt = [BOS] + (full_prompt + [ASSISTANT])[-(kept - 1) :]
    assert rows["rejected_inputs"][0].tolist() == (prompt + rejected)[:-1]
    chosen_len = len(vocab.encode("def a():")) + 1
    assert rows["chosen_inputs"][0, :kept].tolist() == prompt  # the same prompt on both sides
    assert rows["chosen_weights"][0].sum() == chosen_len


def test_generation_prompts_and_holdout(vocab):
    items = [PromptItem([_turn("user", "q")], "f"), [_turn("user", "r")]]
    assert examples.encode_prompts(vocab, items) == [
        [BOS, USER, *vocab.encode("q"), END, ASSISTANT],
        [BOS, USER, *vocab.encode("r"), END, ASSISTANT],
    ]
    data = list(range(100))
    train, held = examples.split_holdout(data, 0.1, seed=3)
    assert len(held) == 10 and sorted(train + held) == data and train == sorted(train)
    assert examples.split_holdout(data, 0.1, seed=3) == (train, held)
    assert examples.split_holdout(data, 0.1, seed=4)[1] != held
    assert examples.split_holdout(data[:3], 0.01, 0)[1] != []  # at least one held out
    assert examples.split_holdout(data, 0.0, 0) == (data, [])
    with pytest.raises(ConfigError, match="eval_fraction"):
        examples.split_holdout(data, 1.0, 0)


# -- rewards ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion, answer, signature, fmt",
    [
        ("def f(a, b=1):", "f", 2.0, 1.0),
        ("  def f(*args, key=None, **kw):  # returns None\n", "f", 2.0, 1.0),
        ("def f(a, b=1):", "g", 1.0, 1.0),
        ("def f(a, b=1):", None, 1.0, 1.0),
        ("def f(a, b=1)", "f", 0.0, 0.0),  # no colon
        ("def f(a,, b):", "f", 0.0, 0.0),
        ("def f(a):\n    return a", "f", 0.0, 0.0),  # more than the line
        ("def f(a,\n      b):", "f", 0.0, 0.0),  # not one line
        ("def f(a): return a", "f", 0.0, 0.0),  # a body is not a signature
        ("class f:", "f", 0.0, 0.0),
        ("f(a)", "f", 0.0, 0.0),
        ("", "f", 0.0, 0.0),
    ],
)
def test_rewards_on_hand_made_completions(completion, answer, signature, fmt):
    assert rewards.get_reward("signature")("prompt", completion, answer) == signature
    assert rewards.get_reward("format")("prompt", completion, answer) == fmt


def test_get_reward_by_path_and_unknown_names():
    assert rewards.get_reward("lm.finetune.rewards:format_reward") is rewards.format_reward
    with pytest.raises(ConfigError, match="format, signature"):
        rewards.get_reward("exact")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        rewards.get_reward("lm.finetune.rewards:nope")


# -- project-made data -----------------------------------------------------------------------


def test_stdlib_instructions_are_deterministic_checkable_and_sized():
    conversations = make_data.instructions(120, seed=0)
    assert len(conversations) == 120
    assert make_data.instructions(120, seed=0) == conversations
    assert make_data.instructions(40, seed=0) == conversations[:40]
    assert make_data.instructions(40, seed=1) != conversations[:40]
    prompts = [c[0]["content"] for c in conversations]
    assert len(set(prompts)) == 120
    for user, assistant in conversations:
        assert user["role"] == "user" and user["content"].startswith(make_data.PROMPT_PREFIX)
        assert assistant["role"] == "assistant"
        assert "self" not in assistant["content"].split("(")[1].split(",")[0]
        assert len(assistant["content"]) <= make_data.MAX_SIGNATURE_CHARS
        assert rewards.format_reward("", assistant["content"], None) == 1.0
    items = make_data.verifiable(120, seed=0)
    assert [i.prompt for i in items] == [c[:1] for c in conversations]
    for item, (_, assistant) in zip(items, conversations):
        assert rewards.signature_reward("", assistant["content"], item.answer) == 2.0


def test_stdlib_preferences_differ_only_by_a_style_sft_never_shows():
    pairs = make_data.preferences(80, seed=0)
    assert len(pairs) == 80 and make_data.preferences(80, seed=0) == pairs
    # The same prompts as the SFT data, stubs (nothing to say about what they return) left out.
    found = [e for e in make_data.stdlib_examples(200, seed=0) if e.returns is not None]
    assert [(p.prompt[0]["content"], p.rejected) for p in pairs] == [
        (e.prompt, e.signature) for e in found[:80]
    ]
    comments = {f"  # {c}" for c in make_data.RETURNS_COMMENT.values()}
    for pair in pairs:
        assert pair.chosen.startswith(pair.rejected)  # rejected: the plain answer SFT teaches
        assert pair.chosen[len(pair.rejected) :] in comments
        assert rewards.signature_reward("", pair.chosen, pair.rejected[4:].split("(")[0]) == 2.0
    assert not any("  # " in c[1]["content"] for c in make_data.instructions(200, seed=0))
    assert {p.chosen.rsplit("# ", 1)[1] for p in pairs} >= {"returns a value", "returns None"}


def test_loaders_take_stdlib_kinds_or_jsonl(tmp_path):
    items, rejects = make_data.load_sft_data("stdlib:instructions", 10, 0)
    assert items == make_data.instructions(10, 0) and rejects == {}
    with pytest.raises(ConfigError, match="stdlib:preferences is preferences data"):
        make_data.load_sft_data("stdlib:preferences", 10, 0)
    with pytest.raises(ConfigError, match="stdlib:nope is not one of"):
        make_data.load_prompt_data("stdlib:nope")
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": str(i), "answer": "a"} for i in range(5)] + [7])
    items, rejects = make_data.load_prompt_data(path, max_examples=2)
    assert [i.prompt[0]["content"] for i in items] == ["0", "1"] and rejects == {"not_object": 1}


def test_make_data_cli_writes_what_the_readers_read_back(tmp_path):
    out = tmp_path / "instructions.jsonl"
    command = [sys.executable, "-m", "lm.finetune.make_data", "--kind=instructions"]
    run = subprocess.run(
        [*command, f"--out={out}", "--max_examples=30", "--seed=2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert formats.read_conversations(str(out)) == (make_data.instructions(30, 2), {})
    for kind, reader in (("preferences", formats.read_preferences), ("verifiable", None)):
        out = tmp_path / f"{kind}.jsonl"
        assert make_data.main([f"--kind={kind}", f"--out={out}", "--max_examples=30"]) == 0
        expected = getattr(make_data, kind)(30, 0)
        assert (reader or formats.read_prompts)(str(out)) == (expected, {})


MODULE = '''
def top(a, b=None, *rest, key=len, **kw):
    """Return the thing.  More words here."""
    return a


class C:
    def m(self, a, /, b, *, c=1):
        """URL of the place, with more words.

        Details."""
        yield a

    @staticmethod
    def s(x):
        """Write it down somewhere safe."""
        print(x)

    def stub(self):
        """Returns something later on."""
        raise NotImplementedError

    def __init__(self):
        """Dunders are left out of the data."""

    @property
    def p(self):
        """Properties are left out of the data."""

    def long_default(self, x="a very long default value that goes on"):
        """Long defaults are left out of the data."""


def outer():
    def nested():
        """Nested functions are left out."""
'''


def test_signatures_and_return_kinds_from_a_hand_written_module():
    found = make_data.examples_of_module(MODULE)
    assert [(e.prompt[len(make_data.PROMPT_PREFIX) :], e.signature, e.returns) for e in found] == [
        ("return the thing.", "def top(a, b=None, *rest, key=len, **kw):", "value"),
        ("URL of the place, with more words.", "def m(a, /, b, *, c=1):", "generator"),
        ("write it down somewhere safe.", "def s(x):", "none"),
        ("returns something later on.", "def stub():", None),
    ]
    assert [e.name for e in found] == ["top", "m", "s", "stub"]
