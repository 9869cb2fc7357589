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
        (["train", "--experiment=tinny", "--workdir={tmp}"], "Did you mean: tiny"),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.model.num_layer=3"],
            "--config.model.num_layer is not a config key. Did you mean: model.num_layers",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.optim.lr=fast"],
            "--config.optim.lr expects a float",
        ),
        (
            [
                "train",
                "--experiment=char_tiny",
                "--workdir={tmp}",
                "--config.data.batch_size=16",
                "--config.data.path=/nonexistent/input.txt",
            ],
            "/nonexistent/input.txt",
        ),
        (["sample", "--workdir=/nonexistent/run"], "config.json not found"),
        (["train", "--experiment=tiny", "--workdir={tmp}", "--config.mesh.data=3"], "there are"),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.data.batch_size=13"],
            "data.batch_size=13 must divide",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.train.eval_every=0"],
            "train.eval_every=0 must be >= 1",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.train.steps=-5"],
            "--config.train.steps=-5 must be >= 1",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.train.steps=many"],
            "--config.train.steps expects an int, got 'many'",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.optim.lr=-0.1"],
            "--config.optim.lr=-0.1 must be >= 0",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.optim.b2=1.5"],
            "--config.optim.b2=1.5 must be < 1",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.data.batch_size=0"],
            "--config.data.batch_size=0 must be >= 1",
        ),
        (
            ["train", "--experiment=tiny", "--workdir={tmp}", "--config.data.source=jsnol"],
            "--config.data.source='jsnol' must be one of stdlib, text, dir, jsonl",
        ),
        (
            [
                "tokenizer",
                "train",
                "--experiment=tiny",
                "--output={tmp}/tok",
                "--config.data.source=x",
            ],
            "--config.data.source='x' must be one of",
        ),
    ],
)
def test_user_errors_are_one_line(argv, message, capsys, tmp_path):
    workdir = tmp_path / "run"  # fresh: a run left elsewhere must not change which check fires
    assert main([a.replace("{tmp}", str(workdir)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert not workdir.exists()  # a command that fails validation leaves nothing behind


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
    bad = [*cmd, "--", "train", "--experiment=tinny", "--workdir={tmp}"]
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


def _tree(root) -> dict[str, tuple[int, int, bytes]]:
    """Every file under `root`: (size, mtime in ns, first bytes): what a write would change."""
    import os

    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            st = os.stat(path)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, f.read(4096))
    return out


@pytest.fixture
def finished_run(tiny_workdir, tmp_path):
    """A copy of the shared 30-step run, and the flags that re-run it with its own tokenizer and
    packs (so no re-packing), for tests that must not touch the shared run itself."""
    import os
    import shutil

    from tests.conftest import tiny_train_argv

    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_workdir, workdir)
    same = [
        f"--config.tokenizer.path={os.path.join(tiny_workdir, 'tokenizer', 'spm.model')}",
        f"--config.data.cache_dir={os.path.join(tiny_workdir, 'data_cache')}",
    ]
    corpus = _saved(tiny_workdir)["data"]["path"]  # the same file: the same pack key
    return workdir, tiny_train_argv(workdir, corpus, *same)


def _saved(workdir) -> dict:
    import json
    import os

    return json.load(open(os.path.join(workdir, "config.json")))


def test_a_rerun_with_another_model_fails_before_touching_the_run(finished_run, capsys):
    """A mistyped model override on a finished run: the one-line shape error, and not one file
    of the run written (config.json stays the run's), so `lm sample` still works on it."""
    workdir, argv = finished_run
    before = _tree(workdir)
    assert main([*argv, "--config.model.d_model=96"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: checkpoint 30 in ") and "does not match" in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert _tree(workdir) == before
    assert _saved(workdir)["model"]["d_model"] == 64
    assert main(["sample", f"--workdir={workdir}", "--prompt=the ", "--max_new_tokens=4"]) == 0
    assert capsys.readouterr().out.startswith("the ")


def test_a_resumed_run_reports_validation_phases_and_keeps_other_sections(finished_run, capsys):
    """Resuming 30 -> 40 steps: the validation result is a console line, config.json becomes
    the run's new config, and report.md keeps the Evaluation section `lm eval` wrote while the
    training section gains every phase with its time."""
    import os

    from lm.training.report import write_report_section

    workdir, argv = finished_run
    write_report_section(workdir, "evaluation", "## Evaluation\n\n| t | acc | 0.5 |")
    steps = [a for a in argv if not a.startswith("--config.train.steps=")]
    assert main([*steps, "--config.train.steps=40", "--config.train.eval_every=40"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("validation step 40: loss ") for line in out.splitlines()), out
    assert _saved(workdir)["train"]["steps"] == 40
    report = open(os.path.join(workdir, "report.md")).read()
    assert report.count("## Evaluation") == 1 and "| t | acc | 0.5 |" in report
    assert report.index("## Summary") < report.index("## Evaluation") < report.index("## Config")
    for phase in ("compiling the train step", "training steps 30-40", "whole command"):
        assert f"| {phase} |" in report or f"| **{phase}** |" in report, phase


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    import lm.cli

    def interrupted(args, overrides):
        raise KeyboardInterrupt

    monkeypatch.setattr(lm.cli, "cmd_experiments", interrupted)
    assert lm.cli.main(["experiments"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"
