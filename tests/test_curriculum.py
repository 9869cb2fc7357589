"""Curriculum: sequence-length warmup, easiest-first document order, and the training loop
following a changing row length."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm import storage  # noqa: E402
from lm.config import default_config  # noqa: E402
from lm.data import packed  # noqa: E402
from lm.data.curriculum import (  # noqa: E402
    Curriculum,
    document_scores,
    order_pieces_by_difficulty,
    shorten_rows,
)
from lm.data.grain_pipeline import FEATURES  # noqa: E402
from lm.data.pack import pack as pack_here  # noqa: E402
from lm.errors import DataError  # noqa: E402
from lm.tokenizer.sentencepiece_tokenizer import load_vocabulary, train_tokenizer  # noqa: E402

SEQ, BATCH = 64, 8


def corpus_cfg(root):
    """Documents of very different lengths: 1 to 40 words."""
    root.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    for i in range(80):
        n = 1 + (i * 7) % 40
        text = " ".join(words[(i + j) % 5] for j in range(n))
        (root / f"doc_{i:02d}.txt").write_text(f"{i} {text}")
    cfg = default_config()
    cfg.data.update(source="dir", path=str(root), include="*.txt", seq_len=SEQ, batch_size=BATCH)
    cfg.data.validation_fraction = 0.1
    cfg.tokenizer.update(vocab_size=56, byte_fallback=False)
    cfg.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_seq_len=SEQ)
    cfg.train.update(steps=100, sample_prompts="")
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cur")
    cfg = corpus_cfg(root / "docs")
    cfg.tokenizer.path = train_tokenizer(cfg.data, cfg.tokenizer, str(root / "tok"))
    return cfg, load_vocabulary(cfg.tokenizer.path), str(root / "work")


def train_iterator(cfg, vocab, workdir: str):
    """The trainer's iterator over packs built by `lm data pack` (here: in this process)."""
    if not packed.is_packed(cfg, workdir):
        pack_here(cfg, workdir)
    return packed.make_train_iterator(cfg, vocab, workdir)


def train_rows(cfg, workdir: str) -> dict[str, np.ndarray]:
    """{feature: [rows, seq_len]} of the packed train split, in packed order."""
    if not packed.is_packed(cfg, workdir):
        pack_here(cfg, workdir)
    name = packed.read_plan(cfg, workdir)["components"][0]["dirs"]["train"]
    split = packed.PackedSplit(storage.join(packed.plan_dir(cfg, workdir), name), FEATURES)
    rows = [split.row(i) for i in range(len(split))]
    return {k: np.stack([r[k] for r in rows]) for k in split.features}


def test_seq_len_warmup_schedule_and_batches(corpus):
    cfg, vocab, workdir = corpus
    cfg = cfg.copy_and_resolve_references()
    cfg.data.curriculum.update(seq_len_warmup_steps=30, seq_len_start=16)
    schedule = Curriculum.from_config(cfg)
    lengths = [schedule.row_len(s) for s in range(40)]
    assert lengths[:10] == [16] * 10 and lengths[10:20] == [32] * 10
    assert lengths[20:] == [64] * 20 and schedule.row_lengths() == [16, 32, 64]

    plain = train_iterator(default_like(cfg), vocab, workdir)
    warm = train_iterator(cfg, vocab, workdir)
    for step in range(25):
        full, short = next(plain), next(warm)
        n = lengths[step]
        assert short["targets"].shape == (BATCH * SEQ // n, n)
        # The same tokens in the same order, only cut shorter.
        for k in ("inputs", "targets", "weights", "segment_ids"):
            assert np.array_equal(short[k].reshape(BATCH, SEQ), full[k])
        assert short["positions"].max() < n
        starts = short["positions"] == 0
        assert starts[:, 0].all()  # every short row starts a (possibly continued) document


def default_like(cfg):
    out = cfg.copy_and_resolve_references()
    out.data.curriculum.seq_len_warmup_steps = 0
    return out


def test_shorten_rows_restarts_positions_of_continued_documents():
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 0]])
    batch = {
        "segment_ids": seg,
        "positions": np.array([[0, 1, 2, 3, 4, 0, 1, 0]]),
        "targets": np.arange(8)[None],
    }
    out = shorten_rows(batch, 4)
    assert out["positions"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 0]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 1], [1, 2, 2, 0]]


def test_difficulty_orders_documents_and_competence_limits_rows(corpus):
    cfg, vocab, workdir = corpus
    cfg = cfg.copy_and_resolve_references()
    cfg.data.curriculum.update(difficulty="length", competence_start=0.2, competence_steps=50)
    rows = train_rows(cfg, workdir)
    # Segments per row fall as documents get longer: rows are easiest (shortest) first.
    segs = np.array([len(set(r[r > 0])) for r in np.asarray(rows["segment_ids"])])
    assert segs[: len(segs) // 4].mean() > 2 * segs[-len(segs) // 4 :].mean()
    schedule = Curriculum.from_config(cfg)
    assert schedule.competence(0) == pytest.approx(0.2) and schedule.competence(50) == 1.0
    assert schedule.competence(10) < schedule.competence(30)

    it = train_iterator(cfg, vocab, workdir)
    n = len(segs)
    index = {r.tobytes(): i for i, r in enumerate(np.asarray(rows["targets"]))}
    drawn = []
    for step in range(60):
        batch = next(it)
        idx = [index[r.tobytes()] for r in batch["targets"]]
        assert max(idx) < max(1, int(np.ceil(schedule.competence(step) * n)))
        drawn.append(np.mean(idx))
    assert np.mean(drawn[:10]) < np.mean(drawn[-10:])


def test_document_order_keeps_pieces_together():
    eos = 1
    pieces = [np.array([5, 6, 7]), np.array([8, eos]), np.array([9, eos]), np.array([4, 4, eos])]
    out = order_pieces_by_difficulty(pieces, eos, "length")
    assert [p.tolist() for p in out] == [[9, eos], [4, 4, eos], [5, 6, 7], [8, eos]]
    scores = document_scores([np.array([5, 5, 5, 5]), np.array([5, 9])], "rarity")
    assert scores[0] < scores[1]  # a rare token makes a document harder


def test_curriculum_config_errors():
    cfg = default_config()
    cfg.data.seq_len = 64
    cfg.data.curriculum.update(seq_len_warmup_steps=10, seq_len_start=24)
    with pytest.raises(DataError, match="seq_len_start"):
        Curriculum.from_config(cfg)
    cfg.data.curriculum.update(seq_len_start=16, difficulty="hardness")
    with pytest.raises(DataError, match="difficulty"):
        Curriculum.from_config(cfg)


@pytest.mark.slow  # ~50 s of training; the schedule itself is checked by the fast tests above
def test_training_follows_the_seq_len_warmup(corpus, tmp_path):
    """The loop trains through the changing row length (one compile per length)."""
    from lm.training.loop import train

    cfg, vocab, _ = corpus
    cfg = cfg.copy_and_resolve_references()
    cfg.tokenizer.path = vocab.sentencepiece_model_file
    cfg.data.curriculum.update(seq_len_warmup_steps=20, seq_len_start=16)
    cfg.train.update(steps=30, log_every=5, eval_every=30, checkpoint_every=30, eval_batches=2)
    train(cfg, str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert losses[-1] < losses[0]
