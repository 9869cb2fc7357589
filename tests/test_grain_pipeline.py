"""`lm data pack` (ArrayRecord packs) and the grain reader: host sharding, state, no TF."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from lm.config import default_config
from lm.data import packed
from lm.data.grain_pipeline import GlobalSampler, GrainBatchIterator

SEQ, BATCH = 32, 8


def _write_docs(root, n: int) -> None:
    for i in range(n):
        body = "".join(f"    value_{i}_{j} = compute({j}, {i})\n" for j in range(1 + i % 7))
        (root / f"doc_{i:04d}.py").write_text(f"def function_{i}(x):\n{body}    return x\n")


def _cfg(root, **data):
    cfg = default_config()
    cfg.data.update(source="dir", path=str(root), seq_len=SEQ, batch_size=BATCH)
    cfg.data.update(**{"validation_fraction": 0.2, **data})
    cfg.tokenizer.update(vocab_size=100, byte_fallback=False)
    return cfg


def _pack(cfg, workdir):
    packed.ensure_packed(cfg, str(workdir))  # runs `lm data pack` in a subprocess
    assert packed.is_packed(cfg, str(workdir))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    _write_docs(root, 40)
    cfg, work = _cfg(root), tmp_path_factory.mktemp("work")
    _pack(cfg, work)
    return cfg, str(work)


def _rows_of(it, steps):
    out = []
    for _ in range(steps):
        batch = next(it)
        out.append((batch, it.last_global_rows()))
    return out


def test_two_hosts_read_disjoint_halves_of_the_one_host_batch(corpus):
    cfg, work = corpus
    one = _rows_of(packed.make_train_iterator(cfg, None, work, 0, 1), 6)
    h0 = _rows_of(packed.make_train_iterator(cfg, None, work, 0, 2), 6)
    h1 = _rows_of(packed.make_train_iterator(cfg, None, work, 1, 2), 6)
    n = packed.read_plan(cfg, work)  # independent source of the row count: meta.json
    meta = json.loads(open(os.path.join(packed.plan_dir(cfg, work), "00-train/meta.json")).read())
    assert n["components"][0]["name"] == "main"
    for (b, rows), (b0, r0), (b1, r1) in zip(one, h0, h1):
        assert len(rows) == BATCH and len(r0) == len(r1) == BATCH // 2
        assert not set(r0) & set(r1)
        assert r0 + r1 == rows
        assert all(0 <= r < meta["rows"] for _, r in rows)
        for k in b:
            np.testing.assert_array_equal(np.concatenate([b0[k], b1[k]]), b[k])
            assert b0[k].shape == (BATCH // 2, SEQ)
    # one epoch reads every row once
    sampler = GlobalSampler([meta["rows"]], lambda s: np.ones(1), BATCH, 0)
    steps = meta["rows"] // BATCH
    seen = [r for s in range(steps) for r in sampler.global_rows(s)[1]]
    assert len(set(seen)) == len(seen) == steps * BATCH


def test_state_resumes_the_same_batches_per_host(corpus):
    cfg, work = corpus
    it = packed.make_train_iterator(cfg, None, work, 1, 2)
    _rows_of(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    after = _rows_of(it, 3)
    again = packed.make_train_iterator(cfg, None, work, 1, 2)
    again.set_state(state)
    assert [r for _, r in _rows_of(again, 3)] == [r for _, r in after]
    assert again.rows_taken == it.rows_taken == [6 * BATCH]


def test_mixture_sampler_is_independent_of_hosts_and_follows_rates():
    rates = np.array([0.75, 0.25])
    sampler = GlobalSampler([50, 30], lambda s: rates, 64, 3)
    which = np.concatenate([sampler.components(s) for s in range(50)])
    assert abs((which == 0).mean() - 0.75) < 0.05
    sources = [
        [{"targets": np.full(4, c * 100 + r)} for r in range(n)] for c, n in [(0, 50), (1, 30)]
    ]
    its = [GrainBatchIterator(sources, sampler, ("targets",), h, 4) for h in range(4)]
    full = GrainBatchIterator(sources, sampler, ("targets",), 0, 1)
    for _ in range(3):
        parts = [next(i)["targets"] for i in its]
        np.testing.assert_array_equal(np.concatenate(parts), next(full)["targets"])
    assert sum(full.rows_taken) == 3 * 64


def test_eval_batches_are_the_same_global_batches_for_any_host_count(corpus):
    cfg, work = corpus
    one = packed.make_eval_batches(cfg, None, work, 3, 0, 1)
    two = [packed.make_eval_batches(cfg, None, work, 3, h, 2) for h in range(2)]
    for b, b0, b1 in zip(one, *two):
        np.testing.assert_array_equal(np.concatenate([b0["targets"], b1["targets"]]), b["targets"])
    assert packed.validation_bytes_per_token(cfg, None, work) > 1.0


_READER = textwrap.dedent(
    """
    import json, sys
    import ml_collections
    from lm.data import packed
    from lm.tokenizer.vocab import load_vocab
    cfg = ml_collections.ConfigDict(json.loads(sys.argv[1]))
    work = sys.argv[2]
    vocab = load_vocab(packed.tokenizer_file(cfg, work))
    it = packed.make_train_iterator(cfg, vocab, work, 0, 1)
    for _ in range(200):
        next(it)
    assert "tensorflow" not in sys.modules and "seqio" not in sys.modules, sorted(
        m for m in sys.modules if m.startswith(("tensorflow", "seqio")))
    print(json.dumps({"vocab": vocab.vocab_size}))
    """
)


def _read_in_fresh_process(cfg, work) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    out = subprocess.run(
        [sys.executable, "-c", _READER, cfg.to_json(), work],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_reader_process_has_no_tf(corpus):
    """Reading batches imports neither TensorFlow nor seqio (the trainer-level check, with
    peak RSS at 1x and 10x, is the slow test below)."""
    cfg, work = corpus
    assert _read_in_fresh_process(cfg, work)["vocab"] == 100


_TRAINER = textwrap.dedent(
    """
    import json, sys
    from lm.config import get_config
    from lm.training.loop import train
    train(get_config("char_tiny", sys.argv[2:]), sys.argv[1])
    assert "tensorflow" not in sys.modules and "seqio" not in sys.modules, sorted(
        m for m in sys.modules if m.startswith(("tensorflow", "seqio")))
    # VmHWM: this process image's own peak. getrusage's ru_maxrss survives exec on Linux, so
    # it would report the forking pytest process's size (GBs late in a long session).
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")][0]
    print(json.dumps({"rss_kb": int(hwm.split()[1])}))
    """
)


@pytest.mark.slow
def test_trainer_peak_rss_does_not_grow_with_a_10x_corpus(tmp_path):
    """`lm train` (packs built beforehand by `lm data pack`, as `lm train` would in a child)
    on a corpus and on one 10x larger: the trainer's peak RSS stays within 10%, although the
    larger pack's rows alone exceed 10% of that RSS (so holding them would show)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(50)]
    paragraph = lambda: " ".join(rng.choice(words, 60))  # noqa: E731
    result = {}
    for scale in (1, 10):
        corpus = tmp_path / f"corpus_{scale}.txt"
        corpus.write_text("\n\n".join(paragraph() for _ in range(10000 * scale)))
        work = tmp_path / f"work_{scale}"
        overrides = [
            f"--config.data.path={corpus}",
            "--config.model.num_layers=1",
            "--config.train.steps=20",
            "--config.train.log_every=10",
            "--config.train.eval_every=20",
            "--config.train.checkpoint_every=20",
            "--config.train.sample_prompts=",
        ]
        pack = [sys.executable, "-m", "lm.cli", "data", "pack", "--experiment=char_tiny"]
        subprocess.run([*pack, f"--workdir={work}", *overrides], env=env, check=True)
        out = subprocess.run(
            [sys.executable, "-c", _TRAINER, str(work), *overrides],
            capture_output=True, text=True, env=env, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        (meta,) = [json.loads(p.read_text()) for p in work.glob("data_cache/*/00-train/meta.json")]
        rows_bytes = sum(p.stat().st_size for p in work.glob("data_cache/*/*/rows.array_record"))
        rss = json.loads(out.stdout.strip().splitlines()[-1])["rss_kb"] * 1024
        result[scale] = dict(rows=meta["rows"], rows_bytes=rows_bytes, rss=rss)
    print("trainer peak RSS and pack sizes at 1x and 10x:", result)
    small, big = result[1], result[10]
    assert big["rows"] >= 9 * small["rows"]  # the text written is 10x; the packs follow it
    # Holding the extra rows in memory would alone break the 10% bound below.
    assert big["rows_bytes"] - small["rows_bytes"] > 0.10 * small["rss"]
    assert abs(big["rss"] - small["rss"]) <= 0.10 * small["rss"]
