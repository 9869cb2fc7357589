"""SentencePiece tokenizer: exact round trips on code, reserved ids, compression numbers."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

from lm.config import default_config  # noqa: E402
from lm.data.documents import iter_documents  # noqa: E402
from lm.errors import DataError  # noqa: E402
from lm.tokenizer.sentencepiece_tokenizer import (  # noqa: E402
    compression_report,
    load_vocabulary,
    train_tokenizer,
)

CODE = (
    "import os\n\n\n"
    "class Reader:\n"
    '    """Reads things."""\n\n'
    "    def read(self, path):\n"
    "        if not path:\n"
    "\t\treturn None  # tab-indented, two spaces before the comment\n"
    "        with open(path) as f:\n"
    "            return [line.rstrip() for line in f]   \n"
    "\n"
    "  x = {'a': 1,  'b': [1, 2, 3]}\r\n"
)
PROSE = (
    "The quick brown fox jumps over the lazy dog. A language model predicts the next "
    "token from the ones before it, and a tokenizer decides what the tokens are. "
    "Common words become single tokens while rare words are spelled out in pieces.\n"
)


def write_corpus(root, n_docs: int = 24) -> str:
    """A directory of small Python and prose documents; returns its path."""
    os.makedirs(root, exist_ok=True)
    for i in range(n_docs):
        code = CODE.replace("Reader", f"Reader{i}").replace("path", f"path_{i % 5}")
        with open(os.path.join(root, f"mod_{i:02d}.py"), "w") as f:
            f.write(code * (1 + i % 3))
        with open(os.path.join(root, f"notes_{i:02d}.txt"), "w") as f:
            f.write(PROSE * (1 + i % 4) + f"Note number {i}.\n")
    return str(root)


def make_cfg(root: str, kind: str = "bpe", vocab_size: int = 300):
    cfg = default_config()
    cfg.data.update(source="dir", path=root, validation_fraction=0.2)
    cfg.tokenizer.update(kind=kind, vocab_size=vocab_size, byte_fallback=False)
    return cfg


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    root = write_corpus(tmp_path_factory.mktemp("corpus"))
    cfg = make_cfg(root)
    path = train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path_factory.mktemp("tok")))
    return cfg, path, load_vocabulary(path)


def test_train_writes_model_and_vocab(bpe):
    _, path, vocab = bpe
    assert path.endswith("spm.model") and os.path.isfile(path)
    assert os.path.isfile(path[: -len(".model")] + ".vocab")
    assert vocab.vocab_size == 300


def test_roundtrip_python_code_keeps_newlines_and_indentation(bpe):
    _, _, vocab = bpe
    ids = vocab.encode(CODE)
    assert vocab.decode(ids) == CODE
    # The TF tokenizer (used by the seqio pipeline) agrees with the Python one.
    assert list(vocab.encode_tf(CODE).numpy()) == list(ids)
    for text in ["    indented", "\n\n\nx", "a\tb", "trailing   \n", " lead"]:
        assert vocab.decode(vocab.encode(text)) == text


def test_reserved_and_special_ids(bpe):
    _, _, vocab = bpe
    sp = vocab.tokenizer
    assert (vocab.pad_id, vocab.eos_id, vocab.unk_id, vocab.bos_id) == (0, 1, 2, 3)
    assert [sp.id_to_piece(i) for i in range(4, 8)] == [
        "<|system|>",
        "<|user|>",
        "<|assistant|>",
        "<|end|>",
    ]
    ids = vocab.encode("<|user|>hi<|end|>")
    assert ids[0] == 5 and ids[-1] == 7


def test_compression_report_on_validation_split(bpe):
    cfg, _, vocab = bpe
    texts = list(iter_documents(cfg.data, "validation"))
    assert texts
    report = compression_report(vocab, texts)
    assert report["bytes"] == sum(len(t.encode()) for t in texts)
    assert report["tokens"] > 0 and report["unk_tokens"] == 0
    assert report["bytes_per_token"] == pytest.approx(report["bytes"] / report["tokens"])
    prose = compression_report(vocab, [PROSE])
    assert 1.5 < prose["bytes_per_token"] < 10


def test_char_with_large_vocab_just_works(tmp_path):
    text = tmp_path / "input.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 50)
    cfg = default_config()
    cfg.data.update(source="text", path=str(text))
    cfg.tokenizer.update(kind="char", vocab_size=256, byte_fallback=False)
    vocab = load_vocabulary(train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path / "tok")))
    assert vocab.vocab_size < 256
    sample = "Before we proceed\n"
    assert vocab.decode(vocab.encode(sample)) == sample
    assert len(vocab.encode(sample)) == len(sample)


def test_unigram_and_byte_fallback(tmp_path):
    root = write_corpus(tmp_path / "c", n_docs=8)
    cfg = make_cfg(root, kind="unigram", vocab_size=400)
    cfg.tokenizer.byte_fallback = True
    vocab = load_vocabulary(train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path / "tok")))
    unseen = "naïve café ✓\n"
    assert vocab.decode(vocab.encode(unseen)) == unseen  # unseen chars go through bytes


def test_missing_model_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nope" / "spm.model")
    with pytest.raises(FileNotFoundError, match="nope/spm.model"):
        load_vocabulary(missing)


def test_empty_corpus_is_a_data_error(tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = make_cfg(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="no training text"):
        train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path / "tok"))


def test_training_is_deterministic(bpe, tmp_path):
    cfg, path, _ = bpe
    again = train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path / "again"))
    with open(path, "rb") as a, open(again, "rb") as b:
        assert a.read() == b.read()


def test_tokenizer_train_command_prints_no_tensorflow_or_cuda_lines(tmp_path):
    """`lm tokenizer train` as a new user runs it (no TF_CPP_MIN_LOG_LEVEL in the environment):
    its stderr holds none of TensorFlow's start-up lines (absl, oneDNN, cuda drivers, cuInit)."""
    import subprocess
    import sys

    corpus = write_corpus(tmp_path / "corpus")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cmd = [sys.executable, "-m", "lm.cli", "tokenizer", "train", "--experiment=tiny"]
    args = [
        f"--output={tmp_path / 'tok'}",
        "--config.data.source=dir",
        f"--config.data.path={corpus}",
        "--config.tokenizer.vocab_size=300",
        "--config.tokenizer.byte_fallback=false",
    ]
    result = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith(f"tokenizer: {tmp_path / 'tok' / 'spm.model'} (bpe, vocab 300)")
    noise = ("I0000", "W0000", "E0000", "absl::InitializeLog", "cuInit", "cuda", "oneDNN")
    assert [line for line in result.stderr.splitlines() if any(n in line for n in noise)] == []
