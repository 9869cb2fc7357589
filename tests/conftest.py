"""Shared fixtures: `gcs`, a GCS emulator on 127.0.0.1 (see gcs_emulator.py); `tiny_workdir`, a
small trained run with a BPE tokenizer that has the chat role tokens (evaluation and serving)."""

import pytest
from gcs_emulator import emulator_environment, running_emulator


@pytest.fixture(scope="session")
def gcs():
    """A running GCS emulator with one bucket; this process's environment points at it."""
    with running_emulator() as emulator, emulator_environment(emulator):
        yield emulator


def tiny_train_argv(workdir: str, corpus: str, *extra: str) -> list[str]:
    """`lm train` of `tiny` shrunk to 2 layers of width 64 on a small text corpus: 30 steps, a
    320-piece BPE tokenizer with the chat role tokens, 128-token context."""
    return [
        "train",
        "--experiment=tiny",
        f"--workdir={workdir}",
        "--config.data.source=text",
        f"--config.data.path={corpus}",
        "--config.tokenizer.vocab_size=320",
        "--config.model.d_model=64",
        "--config.model.num_heads=4",
        "--config.model.d_ff=128",
        "--config.data.batch_size=8",
        "--config.train.steps=30",
        "--config.train.steps_per_call=10",
        "--config.train.log_every=10",
        "--config.train.eval_every=30",
        "--config.train.checkpoint_every=30",
        "--config.train.eval_batches=2",
        "--config.train.sample_prompts=",
        *extra,
    ]


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory) -> str:
    """A trained (30 steps) small `tiny` run, shared by the evaluation and serving tests."""
    from lm.cli import main
    from tests.train_run import write_corpus

    root = tmp_path_factory.mktemp("tiny_run")
    corpus = write_corpus(root / "corpus.txt", paragraphs=300)
    workdir = str(root / "run")
    assert main(tiny_train_argv(workdir, corpus)) == 0
    return workdir


@pytest.fixture
def stage_updates(monkeypatch) -> list:
    """(stage name, done, total) of every `Stage.update` while the test runs (lm/stages.py)."""
    from lm import stages

    updates = []
    update = stages.Stage.update

    def recording(self, done, total=None):
        updates.append((self.name, done, total or self.total))
        update(self, done, total)

    monkeypatch.setattr(stages.Stage, "update", recording)
    return updates
