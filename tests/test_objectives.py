"""Masked objectives: BERT-style MLM and T5-style span corruption, as preprocessors and rows."""

import hashlib
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import seqio  # noqa: E402
import tensorflow as tf  # noqa: E402

from data_mixtures import objectives as obj  # noqa: E402
from lm.config import default_config  # noqa: E402
from lm.tokenizer.sentencepiece_tokenizer import train_tokenizer  # noqa: E402

BASE, EXTRA = 200, 40  # stand-in vocabulary: ids [0, 200) + 40 extra ids [200, 240)
EOS, BOS = 1, 3


class SizedVocab(seqio.PassThroughVocabulary):
    """Only the sizes matter to the objectives: a base vocabulary plus seqio extra ids."""

    def __init__(self, base: int, extra_ids: int):
        super().__init__(base, eos_id=EOS)
        self._extra_ids = extra_ids


VOCAB = SizedVocab(BASE, EXTRA)
FEATURES = {"targets": seqio.Feature(VOCAB)}


def make_pieces(count: int, seed: int = 0, lo: int = 2, hi: int = 300) -> list[np.ndarray]:
    """Random token pieces in [4, BASE), about half of them ending in EOS (a document's end)."""
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(count):
        piece = rng.integers(4, BASE, size=int(rng.integers(lo, hi + 1)), dtype=np.int32)
        if rng.random() < 0.5:
            piece[-1] = EOS
        pieces.append(piece)
    return pieces


def to_dataset(pieces: list[np.ndarray]) -> tf.data.Dataset:
    return tf.data.Dataset.from_tensor_slices({"targets": tf.ragged.constant(pieces)})


def run(ds: tf.data.Dataset) -> list[dict]:
    return list(ds.as_numpy_iterator())


def digest(examples: list[dict]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        for k in sorted(ex):
            h.update(k.encode() + np.ascontiguousarray(ex[k]).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------- MLM

MASK = VOCAB.vocab_size - 1


@pytest.fixture(scope="module")
def mlm_examples():
    pieces = make_pieces(900)
    out = run(obj.mlm_mask(to_dataset(pieces), None, FEATURES, mask_id=MASK, seed=7))
    return pieces, out


def test_mlm_selects_15_percent_never_eos(mlm_examples):
    pieces, out = mlm_examples
    assert len(out) == len(pieces)
    selected = total = 0
    for piece, ex in zip(pieces, out):
        np.testing.assert_array_equal(ex["targets"], piece)
        w = ex["mlm_weights"]
        assert w.dtype == np.float32 and set(np.unique(w)) <= {0.0, 1.0}
        n = len(piece)
        assert w.sum() == max(1, round(n * 0.15))  # exact count per example
        assert not w[piece == EOS].any()
        unselected = w == 0
        np.testing.assert_array_equal(ex["inputs"][unselected], piece[unselected])
        selected += w.sum()
        total += n
    assert abs(selected / total - 0.15) < 0.003


def test_mlm_80_10_10(mlm_examples):
    _, out = mlm_examples
    inputs = np.concatenate([ex["inputs"][ex["mlm_weights"] == 1] for ex in out])
    original = np.concatenate([ex["targets"][ex["mlm_weights"] == 1] for ex in out])
    assert len(inputs) > 20_000
    masked = inputs == MASK
    kept = inputs == original  # includes the ~0.05% random draws equal to the original
    replaced = ~masked & ~kept
    assert abs(masked.mean() - 0.8) < 0.02
    assert abs(kept.mean() - 0.1) < 0.02
    assert abs(replaced.mean() - 0.1) < 0.02
    # Random replacements are ordinary ids: never special (0-3), never the mask or a sentinel.
    assert inputs[replaced].min() >= 4 and inputs[replaced].max() < BASE
    assert len(np.unique(inputs[replaced])) > 150  # spread over the vocabulary


def test_mlm_deterministic_across_iterations_and_processes(mlm_examples):
    pieces, out = mlm_examples
    ds = obj.mlm_mask(to_dataset(pieces[:50]), None, FEATURES, mask_id=MASK, seed=7)
    first, second = run(ds), run(ds)
    assert digest(first) == digest(second) == digest(out[:50])
    other = run(obj.mlm_mask(to_dataset(pieces[:50]), None, FEATURES, mask_id=MASK, seed=8))
    assert digest(other) != digest(first)
    # The same pipeline in a fresh process gives the same bytes.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import test_objectives as t; "
        "ds = t.obj.mlm_mask(t.to_dataset(t.make_pieces(900)[:50]), None, t.FEATURES, "
        "mask_id=t.MASK, seed=7); print(t.digest(t.run(ds)))"
    )
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    result = subprocess.run(
        [sys.executable, "-c", code, tests_dir], capture_output=True, text=True, check=True
    )
    assert result.stdout.split()[-1] == digest(first)


def test_mlm_as_task_preprocessor():
    """Usable in a seqio Task's preprocessor list via functools.partial."""
    import functools

    seqio.TaskRegistry.remove("test_objectives_mlm")
    seqio.TaskRegistry.add(
        "test_objectives_mlm",
        source=seqio.FunctionDataSource(
            lambda split, shuffle_files: to_dataset(make_pieces(5, seed=3)), splits=["train"]
        ),
        preprocessors=[functools.partial(obj.mlm_mask, mask_id=MASK, seed=1)],
        output_features={"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)},
    )
    task = seqio.get_mixture_or_task("test_objectives_mlm")
    out = run(task.get_dataset(None, split="train", shuffle=False))
    assert len(out) == 5 and all(ex["mlm_weights"].sum() >= 1 for ex in out)


# ---------------------------------------------------------------- span corruption


def split_spans(targets: np.ndarray) -> dict[int, list[int]]:
    """{sentinel: its span's tokens} from span targets [S0 ... S1 ... EOS]."""
    assert targets[-1] == EOS
    spans, current = {}, None
    for t in targets[:-1]:
        if t >= BASE:
            current = int(t)
            spans[current] = []
        else:
            spans[current].append(int(t))
    return spans


def reconstruct(inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
    spans = split_spans(targets)
    out = []
    for t in inputs:
        out.extend(spans.pop(int(t)) if t >= BASE else [int(t)])
    assert not spans  # every span was used exactly once
    return np.array(out, np.int32)


@pytest.fixture(scope="module")
def span_examples():
    pieces = make_pieces(600, seed=1, lo=3)
    out = run(obj.span_corruption(to_dataset(pieces), None, FEATURES, seed=5))
    return pieces, out


def test_span_corruption_reconstructs_and_orders_sentinels(span_examples):
    pieces, out = span_examples
    assert len(out) == len(pieces)  # all pieces have >= 2 content tokens
    for piece, ex in zip(pieces, out):
        inputs, targets = ex["inputs"], ex["targets"]
        np.testing.assert_array_equal(reconstruct(inputs, targets), piece)
        # The EOS of a document's last piece is never noise: it ends the inputs.
        assert (inputs[-1] == EOS) == (piece[-1] == EOS)
        assert targets[-1] == EOS and (targets[:-1] != EOS).all()
        sentinels = inputs[inputs >= BASE]
        expected = VOCAB.vocab_size - 1 - np.arange(len(sentinels))
        np.testing.assert_array_equal(sentinels, expected)
        np.testing.assert_array_equal(targets[targets >= BASE], expected)
        assert targets[0] == VOCAB.vocab_size - 1  # the targets open with sentinel 0
        assert inputs[0] < BASE  # ... and the inputs with a non-noise token


def test_span_corruption_density_and_mean_span(span_examples):
    pieces, out = span_examples
    content = noise = spans = 0
    for piece, ex in zip(pieces, out):
        n = len(piece) - int(piece[-1] == EOS)
        k = int((ex["targets"] >= BASE).sum())
        content += n
        noise += len(ex["targets"]) - k - 1
        spans += k
        lengths = [len(s) for s in split_spans(ex["targets"]).values()]
        assert min(lengths) >= 1
    assert abs(noise / content - 0.15) < 0.005
    assert abs(noise / spans - 3.0) < 0.2


def test_span_corruption_drops_pieces_without_two_content_tokens():
    pieces = [np.array(p, np.int32) for p in ([EOS], [7, EOS], [7, 8], [7, 8, EOS])]
    out = run(obj.span_corruption(to_dataset(pieces), None, FEATURES))
    assert len(out) == 2
    np.testing.assert_array_equal(out[0]["inputs"], [7, VOCAB.vocab_size - 1])
    np.testing.assert_array_equal(out[0]["targets"], [VOCAB.vocab_size - 1, 8, EOS])
    np.testing.assert_array_equal(out[1]["inputs"], [7, VOCAB.vocab_size - 1, EOS])


@pytest.mark.parametrize("seq_len", [16, 64, 128])
def test_span_corruption_lengths_fit_and_are_maximal(seq_len):
    raw_len, inputs_len, targets_len = obj.span_corruption_lengths(seq_len)
    assert inputs_len + targets_len <= seq_len
    assert 0.8 * seq_len < raw_len < seq_len
    # Every piece length up to raw_len + 1, with and without EOS (lengths do not depend on
    # the seed: only on the piece length and its EOS).
    pieces = [
        np.append(np.arange(10, 10 + m - eos, dtype=np.int32), [EOS] * eos)
        for m in range(3, raw_len + 2)
        for eos in (0, 1)
    ]
    out = run(obj.span_corruption(to_dataset(pieces), None, FEATURES))
    assert len(out) == len(pieces)
    fit = [ex for p, ex in zip(pieces, out) if len(p) <= raw_len]
    assert max(len(ex["inputs"]) for ex in fit) == inputs_len
    assert max(len(ex["targets"]) for ex in fit) == targets_len
    # One token longer and the longest inputs and targets no longer fit one row together.
    longest = max(len(ex["inputs"]) for ex in out) + max(len(ex["targets"]) for ex in out)
    assert longest > seq_len


# ---------------------------------------------------------------- packed rows

SEQ = 64


@pytest.fixture(scope="module")
def sp_vocab(tmp_path_factory):
    """A real 64-piece SentencePiece vocabulary with 16 seqio extra ids."""
    root = tmp_path_factory.mktemp("docs")
    for i in range(12):
        text = f"def function_{i}(alpha, beta):\n    return alpha * {i} + beta - {i * 7}\n"
        (root / f"doc_{i}.py").write_text(text * 5)
    cfg = default_config()
    cfg.data.update(source="dir", path=str(root), validation_fraction=0.0)
    cfg.tokenizer.update(vocab_size=64, byte_fallback=False, special_tokens="")
    path = train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path_factory.mktemp("tok")))
    return seqio.SentencePieceVocabulary(path, extra_ids=16)


def doc_pieces(vocab: seqio.Vocabulary, seed: int) -> list[np.ndarray]:
    """Documents of 1..150 tokens cut into <= SEQ pieces, EOS ending each document."""
    rng = np.random.default_rng(seed)
    pieces = []
    for _ in range(60):
        doc = np.append(
            rng.integers(4, vocab.vocab_size - vocab.extra_ids, rng.integers(1, 150)), EOS
        )
        pieces.extend(doc[i : i + SEQ].astype(np.int32) for i in range(0, len(doc), SEQ))
    return pieces


def segments(row: dict) -> list[np.ndarray]:
    """Index arrays of each segment of a packed row, in order."""
    ids = row["segment_ids"]
    assert (np.diff(ids[ids > 0]) >= 0).all() and (ids[: (ids > 0).sum()] > 0).all()
    return [np.flatnonzero(ids == s) for s in np.unique(ids[ids > 0])]


def check_layout(rows: list[dict], keys: set[str]) -> None:
    assert rows
    for row in rows:
        assert set(row) == keys
        for k, v in row.items():
            assert v.shape == (SEQ,), k
            assert v.dtype == (np.float32 if k == "weights" else np.int32), k
        pad = row["segment_ids"] == 0
        assert not row["inputs"][pad].any() and not row["targets"][pad].any()
        assert not row["weights"][pad].any()
        for idx in segments(row):
            np.testing.assert_array_equal(row["positions"][idx], np.arange(len(idx)))


def test_packed_mlm_rows(sp_vocab):
    pieces = doc_pieces(sp_vocab, seed=0)
    rows = run(obj.packed_objective_rows(to_dataset(pieces), "mlm", SEQ, sp_vocab, seed=3))
    check_layout(rows, {"inputs", "targets", "segment_ids", "positions", "weights"})
    mask_id = obj.mlm_mask_id(sp_vocab)
    assert mask_id == sp_vocab.vocab_size - 1
    got, masked = [], 0
    for row in rows:
        w = row["weights"]
        assert set(np.unique(w)) <= {0.0, 1.0}
        assert not w[row["targets"] == EOS].any()
        np.testing.assert_array_equal(row["inputs"][w == 0], row["targets"][w == 0])
        masked += (row["inputs"][w == 1] == mask_id).sum()
        for idx in segments(row):
            assert w[idx].sum() == max(1, round(len(idx) * 0.15)) or len(idx) == 1
            got.append(row["targets"][idx])
    assert 0.7 < masked / sum(row["weights"].sum() for row in rows) < 0.9
    # Each segment is exactly one input piece, in order: no piece is cut or mixed with another.
    assert len(got) == len(pieces)
    for a, b in zip(got, pieces):
        np.testing.assert_array_equal(a, b)
    again = run(obj.packed_objective_rows(to_dataset(pieces), "mlm", SEQ, sp_vocab, seed=3))
    assert digest(again) == digest(rows)


def test_packed_span_corruption_rows(sp_vocab):
    pieces = doc_pieces(sp_vocab, seed=1)
    rows = run(
        obj.packed_objective_rows(to_dataset(pieces), "span_corruption", SEQ, sp_vocab, seed=3)
    )
    check_layout(rows, {"inputs", "targets", "segment_ids", "positions", "weights", "prefix"})
    raw_len = obj.span_corruption_lengths(SEQ)[0]
    got = []
    for row in rows:
        assert not row["prefix"][row["segment_ids"] == 0].any()
        for idx in segments(row):
            targets, inputs = row["targets"][idx], row["inputs"][idx]
            weights, prefix = row["weights"][idx], row["prefix"][idx]
            # Decoder inputs: BOS, then the sequence shifted right by one.
            assert inputs[0] == BOS
            np.testing.assert_array_equal(inputs[1:], targets[:-1])
            # [span inputs ; span targets]: weights on the span targets, which start with
            # sentinel 0; prefix on the span inputs plus the one position that reads the last.
            width = int(np.argmax(weights))
            np.testing.assert_array_equal(weights, np.arange(len(idx)) >= width)
            np.testing.assert_array_equal(prefix, np.arange(len(idx)) <= width)
            assert targets[width] == sp_vocab.vocab_size - 1 and targets[-1] == EOS
            span_inputs, span_targets = targets[:width], targets[width:]
            # Reconstruct the raw piece from the sentinels.
            spans, current = {}, None
            for t in span_targets[:-1]:
                if t >= sp_vocab.vocab_size - sp_vocab.extra_ids:
                    current = int(t)
                    spans[current] = []
                else:
                    spans[current].append(int(t))
            sentinels = [int(t) for t in span_inputs if t in spans]
            assert (
                sentinels
                == sorted(spans, reverse=True)
                == list(range(sp_vocab.vocab_size - 1, sp_vocab.vocab_size - 1 - len(spans), -1))
            )
            got.append([x for t in span_inputs for x in spans.get(int(t), [int(t)])])
    # Segments are exactly the pieces re-cut to raw_len (minus those too short to corrupt).
    expected = [
        list(p[i : i + raw_len])
        for p in pieces
        for i in range(0, len(p), raw_len)
        if len(p[i : i + raw_len]) - (p[i : i + raw_len][-1] == EOS) >= 2
    ]
    assert got == expected
    assert sum(map(len, got)) > 0.9 * sum(map(len, pieces))


# ---------------------------------------------------------------- errors


def test_objective_errors(sp_vocab):
    assert obj.validate_objective("mlm") == "mlm"
    with pytest.raises(ValueError, match=r"data\.objective.*'bert'"):
        obj.validate_objective("bert")
    ds = to_dataset(make_pieces(3))
    with pytest.raises(ValueError, match=r"data\.objective"):
        obj.packed_objective_rows(ds, "bert", SEQ, sp_vocab, 0)
    with pytest.raises(ValueError, match=r"'lm'"):
        obj.packed_objective_rows(ds, "lm", SEQ, sp_vocab, 0)
    with pytest.raises(ValueError, match=r"too short"):
        obj.span_corruption_lengths(3)


def test_too_few_extra_ids():
    plain = SizedVocab(BASE, 0)
    ds = to_dataset(make_pieces(3))
    with pytest.raises(ValueError, match=r"tokenizer\.extra_ids >= 1"):
        obj.packed_objective_rows(ds, "mlm", SEQ, plain, 0)
    # 512-token pieces need round(round(0.15 * 512) / 3) = 26 sentinels.
    few = SizedVocab(BASE, 25)
    with pytest.raises(ValueError, match=r"needs up to 26 sentinel.*tokenizer\.extra_ids >= 26"):
        obj.packed_objective_rows(ds, "span_corruption", 575, few, 0)
    with pytest.raises(ValueError, match=r"tokenizer\.extra_ids"):
        obj.span_corruption(ds, {"targets": 512}, {"targets": seqio.Feature(few)})
    # Without a length to check up front, the budget is enforced when the data runs.
    long_piece = to_dataset([np.arange(4, 604, dtype=np.int32)])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"tokenizer\.extra_ids"):
        run(obj.span_corruption(long_piece, None, {"targets": seqio.Feature(few)}))
