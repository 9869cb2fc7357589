"""Mixtures: components registered as seqio Tasks + Mixture, trained-on proportions match rates,
step-dependent rates, resumable state, the pack key follows every component's files, clear config
errors."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import seqio  # noqa: E402

from lm.config import default_config, mixture_component  # noqa: E402
from lm.data import documents, mixture, packed  # noqa: E402
from lm.data.documents import iter_documents  # noqa: E402
from lm.data.pack import pack as pack_here  # noqa: E402
from lm.errors import (
    ConfigError,  # noqa: E402
    DataError,  # noqa: E402
)
from lm.tokenizer.sentencepiece_tokenizer import load_vocabulary, train_tokenizer  # noqa: E402

SEQ, BATCH = 32, 8


def write_docs(root, prefix: str, n: int, line: str) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"{prefix}_{i:02d}.txt").write_text(
            "".join(f"{line} {prefix} {i} {j}\n" for j in range(2 + i % 5))
        )


def mixture_cfg(tmp_path, code_rate=0.75, prose_rate=0.25, **prose):
    write_docs(tmp_path / "code", "code", 40, "x = compute(y) + value")
    write_docs(tmp_path / "prose", "prose", 40, "the quick brown fox jumps over")
    cfg = default_config()
    cfg.data.update(seq_len=SEQ, batch_size=BATCH, validation_fraction=0.2, include="*.txt")
    cfg.data.mixture = dict(
        code=mixture_component(cfg.data, code_rate, source="dir", path=str(tmp_path / "code")),
        prose=mixture_component(
            cfg.data, prose_rate, source="dir", path=str(tmp_path / "prose"), **prose
        ),
    )
    cfg.data.source = "mixture"
    cfg.tokenizer.update(vocab_size=120, byte_fallback=False)
    cfg.model.update(num_layers=1, d_model=32, num_heads=2, d_ff=64, max_seq_len=SEQ)
    cfg.train.update(steps=40, log_every=20, eval_every=40, eval_batches=2, sample_prompts="")
    cfg.train.update(checkpoint_every=40)
    return cfg


def train_iterator(cfg, vocab, workdir: str):
    """The trainer's iterator over packs built by `lm data pack` (here: in this process, which
    has the test's seqio registrations)."""
    cfg.tokenizer.path = vocab.sentencepiece_model_file
    if not packed.is_packed(cfg, workdir):
        pack_here(cfg, workdir)
    return packed.make_train_iterator(cfg, vocab, workdir)


@pytest.fixture(scope="module")
def vocab_for(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    cfg = mixture_cfg(root)
    path = train_tokenizer(cfg.data, cfg.tokenizer, str(tmp_path_factory.mktemp("tok")))
    return root, load_vocabulary(path)


@pytest.mark.slow  # ~25 s of training; the mixture sampling itself is checked above
def test_trained_mixture_proportions_match_rates(tmp_path):
    """`lm train` on a two-component mixture: the rows it trained on follow the rates, which
    `lm data pack` read back from the seqio Mixture it registered and wrote to plan.json."""
    from lm.training.loop import train

    cfg = mixture_cfg(tmp_path / "data")
    cfg.train.steps = 80
    summary = train(cfg.copy_and_resolve_references(), str(tmp_path / "run"))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    last = [r for r in records if r["split"] == "train"][-1]
    assert last["step"] == 80
    # 640 rows: the sampling noise is ~0.017, so 0.05 is about three standard deviations.
    assert last["mix/code"] == pytest.approx(0.75, abs=0.05)
    assert last["mix/prose"] == pytest.approx(0.25, abs=0.05)
    val = summary["validation"]
    assert np.isfinite(val["loss"]) and val["loss/code"] != val["loss/prose"]
    # The mixed validation loss weighs each component's by its share of the rows.
    assert min(val["loss/code"], val["loss/prose"]) < val["loss"]
    assert val["loss"] < max(val["loss/code"], val["loss/prose"])
    plan = packed.read_plan(cfg, str(tmp_path / "run"))  # written by the pack subprocess
    rates = {c["name"]: (c["rate"], c["final_rate"]) for c in plan["components"]}
    assert rates == {"code": (0.75, 0.75), "prose": (0.25, 0.25)}


def test_iterator_follows_step_dependent_rates_and_resumes(vocab_for):
    root, vocab = vocab_for
    cfg = mixture_cfg(root, code_rate=1.0, prose_rate=0.0, final_rate=1.0)
    cfg.data.mixture.code.final_rate = 0.0
    cfg.data.curriculum.mixture_steps = 50
    it = train_iterator(cfg, vocab, str(root / "work"))
    code = it.names.index("code")
    shares = []
    for _ in range(60):
        before = it.rows_taken[code]
        next(it)
        shares.append((it.rows_taken[code] - before) / BATCH)
    assert shares[0] == 1.0  # step 0: all code
    assert np.mean(shares[:10]) > 0.8 and np.mean(shares[-10:]) == 0.0  # then all prose
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = train_iterator(cfg, vocab, str(root / "work"))
    resumed.set_state(json.loads(json.dumps(state)))
    for a, b in zip(expected, [next(resumed) for _ in range(3)]):
        assert all(np.array_equal(a[k], b[k]) for k in a)


def test_source_task_reads_a_registered_seqio_mixture(vocab_for, tmp_path, monkeypatch):
    """A user's module in data_mixtures/ registers a seqio Mixture; training finds it by name."""
    import data_mixtures
    from data_mixtures import register_text_task

    root, vocab = vocab_for
    cfg = mixture_cfg(root)
    path = vocab.sentencepiece_model_file
    tasks = [register_text_task(c.data, path) for c in documents.configured_components(cfg.data)]
    (tmp_path / "user_mixture.py").write_text(
        "import seqio\n"
        f"RATES = [({tasks[0]!r}, 3.0), ({tasks[1]!r}, 1.0)]\n"
        "seqio.MixtureRegistry.add('test_user_mixture', RATES)\n"
    )
    monkeypatch.setattr(data_mixtures, "__path__", [*data_mixtures.__path__, str(tmp_path)])
    assert "test_user_mixture" not in seqio.MixtureRegistry.names()
    task_cfg = default_config()
    task_cfg.data.update(source="task", task="test_user_mixture", seq_len=SEQ, batch_size=BATCH)
    components = mixture.components_for_training(task_cfg.data, path)
    assert sorted(c.rate for c in components) == [1.0, 3.0]
    it = train_iterator(task_cfg, vocab, str(root / "work"))
    for _ in range(50):
        next(it)
    share = it.rows_taken[it.names.index(tasks[0])] / (50 * BATCH)
    assert share == pytest.approx(0.75, abs=0.05)
    assert len(packed.make_eval_batches(task_cfg, vocab, str(root / "work"), 2)) == 2


def test_tokenizer_documents_interleave_components_by_rate(tmp_path):
    cfg = mixture_cfg(tmp_path, validation_fraction=0.0)
    cfg.data.mixture.code.validation_fraction = 0.0
    docs = list(iter_documents(cfg.data, "train"))
    first = docs[:20]
    assert sum("code" in d for d in first) == 15  # 3 code documents per prose document
    assert sum("prose" in d for d in docs) == 40  # and nothing is dropped at the end


def test_plan_key_follows_every_component_s_files(tmp_path):
    """Editing one component's documents gives a new pack key, so no stale pack is reused."""
    cfg = mixture_cfg(tmp_path)
    work = str(tmp_path / "work")
    key = packed.plan_key(cfg, work)
    assert packed.plan_key(cfg, work) == key  # stable while nothing changes
    with open(tmp_path / "prose" / "prose_03.txt", "a") as f:
        f.write("one more line of prose\n")
    prose = packed.plan_key(cfg, work)
    assert prose != key
    (tmp_path / "code" / "code_00.txt").unlink()
    assert packed.plan_key(cfg, work) not in (key, prose)


def test_mixture_config_errors(tmp_path):
    cfg = mixture_cfg(tmp_path)
    with pytest.raises(ConfigError, match="not document keys"):
        mixture_component(cfg.data, 1.0, colour="blue")
    cfg.data.mixture.code.rate = 0.0
    cfg.data.mixture.prose.rate = 0.0
    with pytest.raises(DataError, match="rates"):
        documents.configured_components(cfg.data)
    cfg.data.mixture = {}
    with pytest.raises(DataError, match="needs components"):
        documents.configured_components(cfg.data)
