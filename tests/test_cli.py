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


def test_pod_runs_the_command_on_every_host_with_a_prefix():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "lm.cli", "pod", "--processes=2", "--devices_per_process=1"]
    result = subprocess.run([*cmd, "--", "experiments"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    for host in (0, 1):
        assert any(ln.startswith(f"[host {host}] tiny ") for ln in result.stdout.splitlines())
    # The first failing host's status is the pod's.
    bad = [*cmd, "--", "train", "--experiment=tinny", "--workdir=/tmp/x"]
    result = subprocess.run(bad, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "[host 1] error: " in result.stderr


def test_pod_needs_a_command(capsys):
    assert main(["pod", "--processes=0", "--", "experiments"]) == 2
    assert "--processes" in capsys.readouterr().err


def test_job_flags_set_the_job_variables_and_bad_ones_are_one_line(monkeypatch, capsys):
    from lm import distributed

    env = {}
    rest = distributed.take_job_flags(
        ["--coordinator=10.0.0.1:8476", "train", "--num_processes=4", "--process_id=3", "--",
         "--process_id=9"], env,
    )  # fmt: skip
    assert rest == ["train", "--", "--process_id=9"]  # after `--`: the pod's command, untouched
    assert distributed.job_from_env(env) == ("10.0.0.1:8476", 4, 3)
    for var in (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID):
        monkeypatch.setenv(var, "")  # restored (unset) after the test; main sets them
    monkeypatch.setattr(distributed, "_joined", False)  # an earlier test's train joined "alone"
    flags = ["--coordinator=127.0.0.1:1", "--num_processes=2", "--process_id=5"]
    assert main([*flags, "train", "--experiment=tiny", "--workdir=/tmp/never"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: LM_PROCESS_ID=5 must be in [0, LM_NUM_PROCESSES=2)", err
