"""The `lm` command: listing, and one-line errors (exit 2, no traceback) for user mistakes."""

import pytest

from lm.cli import main


def test_experiments_lists_every_shipped_name(capsys):
    assert main(["experiments"]) == 0
    out = capsys.readouterr().out
    for name in ("tiny", "char_tiny", "gpt2_124m", "llama_1b"):
        assert any(line.startswith(name + " ") for line in out.splitlines()), name


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--experiment=tinny", "--workdir=/tmp/x"], "Did you mean: tiny"),
        (
            ["train", "--experiment=tiny", "--workdir=/tmp/x", "--config.model.num_layer=3"],
            "--config.model.num_layer is not a config key. Did you mean: model.num_layers",
        ),
        (
            ["train", "--experiment=tiny", "--workdir=/tmp/x", "--config.optim.lr=fast"],
            "--config.optim.lr expects a float",
        ),
        (
            [
                "train",
                "--experiment=char_tiny",
                "--workdir=/tmp/x",
                "--config.data.batch_size=16",
                "--config.data.path=/nonexistent/input.txt",
            ],
            "/nonexistent/input.txt",
        ),
        (["sample", "--workdir=/nonexistent/run"], "config.json not found"),
        (["train", "--experiment=tiny", "--workdir=/tmp/x", "--config.mesh.data=3"], "there are"),
        (
            ["train", "--experiment=tiny", "--workdir=/tmp/x", "--config.data.batch_size=13"],
            "data.batch_size=13 must divide",
        ),
        (
            ["train", "--experiment=tiny", "--workdir=/tmp/x", "--config.train.eval_every=0"],
            "train.eval_every=0 must be >= 1",
        ),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
