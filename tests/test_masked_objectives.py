"""The masked objectives train end to end: BERT-style MLM on the bidirectional model and T5-style
span corruption as a prefix LM; their losses fall, and mismatched configs fail clearly."""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from lm.config import get_config  # noqa: E402
from lm.errors import ConfigError  # noqa: E402

OVERRIDES = [
    "--config.data.source=stdlib",
    "--config.data.max_documents=150",
    "--config.data.seq_len=64",
    "--config.data.batch_size=16",
    "--config.model.max_seq_len=64",
    "--config.model.num_layers=1",
    "--config.model.d_model=64",
    "--config.model.d_ff=128",
    "--config.tokenizer.vocab_size=512",
    "--config.optim.warmup_steps=10",
    "--config.train.steps=60",
    "--config.train.log_every=10",
    "--config.train.eval_every=60",
    "--config.train.eval_batches=2",
    "--config.train.checkpoint_every=60",
]


@pytest.mark.parametrize(
    "experiment", ["bert_tiny", pytest.param("t5_span_tiny", marks=pytest.mark.slow)]
)
def test_masked_objective_loss_falls(experiment, tmp_path):
    from lm.training.loop import train

    summary = train(get_config(experiment, OVERRIDES), str(tmp_path))
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    losses = [r["loss"] for r in records if r["split"] == "train"]
    assert len(losses) == 6 and np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 0.5, losses
    assert "bits_per_byte" not in summary["validation"]  # no next-token text to compress
    assert summary["samples"] == []


def test_mlm_needs_a_bidirectional_model(tmp_path):
    from lm.training.loop import train

    cfg = get_config("bert_tiny", [*OVERRIDES, "--config.model.causal=true"])
    with pytest.raises(ConfigError, match="causal"):
        train(cfg, str(tmp_path))
