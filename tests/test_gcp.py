"""Tests for gcp/*.sh: run them with --dry-run and check the gcloud commands they print."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

BASH = shutil.which("bash") or "/bin/bash"
GCP = Path(__file__).resolve().parent.parent / "gcp"


FAKE_GCLOUD = """#!/bin/sh
# Stands in for gcloud: records its arguments, one per line, then a separator.
for a in "$@"; do printf '%s\\n' "$a" >> "$FAKE_GCLOUD_LOG"; done
echo ---- >> "$FAKE_GCLOUD_LOG"
"""


@pytest.fixture(scope="module")
def fake_bin(tmp_path_factory) -> Path:
    """A directory with a fake `gcloud`, put first on PATH so no test can reach the real one."""
    d = tmp_path_factory.mktemp("fakebin")
    (d / "gcloud").write_text(FAKE_GCLOUD)
    (d / "gcloud").chmod(0o755)
    return d


def _run(
    script: str, *args: str, env: dict | None = None, path: str | None = None
) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if k != "DRY_RUN"}
    full_env["PATH"] = path if path is not None else f"{_FAKE_BIN}:/usr/bin:/bin"
    full_env.update(env or {})
    return subprocess.run(
        [BASH, str(GCP / script), *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=30,
    )


_FAKE_BIN = ""


@pytest.fixture(autouse=True)
def _use_fake_gcloud(fake_bin):
    global _FAKE_BIN
    _FAKE_BIN = str(fake_bin)


def _commands(out: str) -> list[list[str]]:
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def _flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, argv)
    return values[0]


def test_create_dry_run_spot():
    p = _run(
        "create.sh",
        "--dry-run",
        "--name=lm-test",
        "--zone",
        "us-west4-a",
        "--accelerator-type=v5litepod-16",
        "--spot",
    )
    assert p.returncode == 0, p.stderr
    (cmd,) = _commands(p.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "lm-test"]
    assert _flag(cmd, "zone") == "us-west4-a"
    assert _flag(cmd, "accelerator-type") == "v5litepod-16"
    assert _flag(cmd, "version") == "v2-alpha-tpuv5-lite"
    assert "--spot" in cmd and "--preemptible" not in cmd


def test_create_queued_with_env_dry_run_and_version():
    p = _run(
        "create.sh",
        "--name=q",
        "--zone=us-central2-b",
        "--type=v4-32",
        "--version=tpu-vm-v4-base",
        "--project=my-proj",
        "--queued",
        env={"DRY_RUN": "1"},
    )
    assert p.returncode == 0, p.stderr
    create = _commands(p.stdout)[0]
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "q"]
    assert _flag(create, "node-id") == "q"
    assert _flag(create, "accelerator-type") == "v4-32"
    assert _flag(create, "runtime-version") == "tpu-vm-v4-base"
    assert _flag(create, "project") == "my-proj"
    assert "--spot" not in create


def test_create_preemptible():
    p = _run("create.sh", "--dry-run", "--name=a", "--zone=z", "--type=v6e-8", "--preemptible")
    (cmd,) = _commands(p.stdout)
    assert "--preemptible" in cmd and _flag(cmd, "version") == "v2-alpha-tpuv6e"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--zone=z", "--type=v4-8"], "missing --name"),
        (["--name=a", "--type=v4-8"], "missing --zone"),
        (["--name=a", "--zone=z"], "missing --accelerator-type"),
        (["--name=a", "--zone=z", "--type=v9-8"], "pass --version"),
        (["--name=a", "--zone=z", "--type=v4-8", "--spot", "--preemptible"], "exclusive"),
        (["--name=a", "--zone=z", "--type=v4-8", "--bogus"], "unknown argument"),
        (["--name"], "--name needs a value"),
    ],
)
def test_create_argument_errors(args, message):
    p = _run("create.sh", "--dry-run", *args)
    assert p.returncode == 2
    assert p.stdout == ""
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_teardown_dry_run():
    p = _run("teardown.sh", "--dry-run", "--name=lm-test", "--zone=europe-west4-a")
    assert p.returncode == 0, p.stderr
    (cmd,) = _commands(p.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "lm-test"]
    assert _flag(cmd, "zone") == "europe-west4-a" and "--quiet" in cmd

    p = _run("teardown.sh", "--dry-run", "--name=q", "--zone=z", "--queued")
    (cmd,) = _commands(p.stdout)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "q"]
    assert "--force" in cmd


def test_teardown_missing_zone():
    p = _run("teardown.sh", "--dry-run", "--name=x")
    assert p.returncode == 2 and "missing --zone" in p.stderr and p.stdout == ""


USER_CMD = [
    "lm",
    "train",
    "--experiment=gpt2_124m",
    "--workdir=gs://bucket/runs/a b",
    "--config.optim.lr=6e-4",
    "--config.description=it's a test",
]


def test_launch_dry_run_syncs_installs_and_runs_on_all_workers():
    p = _run("launch.sh", "--dry-run", "--name=lm-test", "--zone=us-west4-a", "--", *USER_CMD)
    assert p.returncode == 0, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    assert len(lines) == 4
    assert "git -C" in lines[0] and "tar -czf" in lines[0]

    scp, install, train = (shlex.split(ln) for ln in lines[1:])
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    for cmd in (scp, install, train):
        assert "--worker=all" in cmd
        assert _flag(cmd, "zone") == "us-west4-a"
    for cmd in (install, train):
        assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "lm-test"]

    setup = _flag(install, "command")
    assert "make install" in setup and "jax[tpu]==" in setup
    subprocess.run(["bash", "-n", "-c", setup], check=True)  # valid shell on the workers

    remote = _flag(train, "command")
    subprocess.run(["bash", "-n", "-c", remote], check=True)
    assert "LM_MULTIHOST=1" in remote
    # The user's command survives both quoting levels word for word.
    user_part = remote.split(" && ")[-1]
    assert shlex.split(user_part) == USER_CMD


def test_launch_no_sync_detach_env_and_command_string():
    p = _run(
        "launch.sh",
        "--dry-run",
        "--name=n",
        "--zone=z",
        "--no-sync",
        "--detach",
        "--env",
        "XLA_FLAGS=--xla_dump_to=/tmp/a b",
        "--command=lm train --config.train.steps=10",
    )
    assert p.returncode == 0, p.stderr
    (cmd,) = _commands(p.stdout)
    remote = _flag(cmd, "command")
    subprocess.run(["bash", "-n", "-c", remote], check=True)
    words = shlex.split(remote.split(" && ")[1])
    assert words[:2] == ["export", "LM_MULTIHOST=1"]
    assert "XLA_FLAGS=--xla_dump_to=/tmp/a b" in words
    detached = shlex.split(remote.split(" && ")[2])
    assert detached[:4] == ["setsid", "nohup", "bash", "-c"]
    assert detached[4] == "lm train --config.train.steps=10"
    assert "launch.log" in detached


@pytest.mark.parametrize(
    "args,message",
    [
        (["--zone=z", "--", "lm", "train"], "missing --name"),
        (["--name=n", "--", "lm", "train"], "missing --zone"),
        (["--name=n", "--zone=z"], "missing command"),
        (["--name=n", "--zone=z", "--command=x", "--", "y"], "not both"),
        (["--name=n", "--zone=z", "--env=1BAD", "--", "y"], "KEY=VALUE"),
        (["--name=n", "--zone=z", "lm", "train"], "unknown argument"),
    ],
)
def test_launch_argument_errors(args, message):
    p = _run("launch.sh", "--dry-run", *args)
    assert p.returncode == 2
    assert p.stdout == ""
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_without_dry_run_needs_gcloud(tmp_path):
    # A PATH with only the tools the script needs, and no gcloud.
    for tool in ("dirname", "basename"):
        (tmp_path / tool).symlink_to(shutil.which(tool))
    p = _run("teardown.sh", "--name=x", "--zone=z", path=str(tmp_path))
    assert p.returncode == 2 and "gcloud not found" in p.stderr


def test_real_run_executes_the_printed_commands(tmp_path):
    log = tmp_path / "gcloud.log"
    args = ("--name=lm-test", "--zone=z", "--no-sync", "--", *USER_CMD)
    dry = _commands(_run("launch.sh", "--dry-run", *args).stdout)
    p = _run("launch.sh", *args, env={"FAKE_GCLOUD_LOG": str(log)})
    assert p.returncode == 0, p.stderr
    calls = [c.strip("\n").split("\n") for c in log.read_text().split("----\n") if c.strip()]
    assert [["gcloud", *c] for c in calls] == dry
    assert "+ gcloud compute tpus tpu-vm ssh" in p.stderr  # echoed before running


def test_scripts_use_strict_mode():
    for name in ("create.sh", "launch.sh", "teardown.sh"):
        text = (GCP / name).read_text()
        assert "set -euo pipefail" in text
        assert os.access(GCP / name, os.X_OK)
