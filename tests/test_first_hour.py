"""A new user's first hour: every command in README.md's code blocks, in order, on a fresh
directory, as the user would type it (shorter step counts appended).

Every README command must match exactly one entry of `STEPS` (a command the README gains
without an entry fails the test), and each entry either runs the command or says why it cannot
run here (a download). A run fails on a non-zero exit, a Python traceback in its output, a
time over its budget, or a README claim about it that does not hold (`check`).

Slow (about 12 minutes on the 2-core machine; each budget is about 4x the time measured there):
`make test-slow`, or `.venv/bin/python -m pytest -m slow tests/test_first_hour.py -s` to see
the timing table; `LM_FIRST_HOUR_ONLY=REGEX` runs the matching commands only.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
LM = str(ROOT / ".venv" / "bin" / "lm")
# Short runs: the commands' own configs, with fewer steps and documents.
SHORT = (
    "--config.train.steps=20",
    "--config.train.eval_every=10",
    "--config.train.checkpoint_every=10",
    "--config.train.log_every=10",
)
FEW_DOCS = ("--config.data.max_documents=300",)
FINETUNE_SHORT = ("--config.train.steps=6", "--config.train.eval_every=6",
                  "--config.train.checkpoint_every=6", "--config.train.log_every=2")  # fmt: skip


def readme_commands(text: str | None = None) -> list[str]:
    """The commands of README.md's ```bash blocks: continuation lines joined, comments dropped."""
    text = text if text is not None else (ROOT / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(shlex.join(words))
    return out


@dataclass
class Step:
    pattern: str  # a regex the whole README command matches
    seconds: float = 0  # the time budget here (0: not run)
    extra: tuple[str, ...] = ()  # appended to the command
    check: Callable[[Path, str], None] | None = None  # (cwd, output) -> asserts a README claim
    skip: str = ""  # why it does not run here
    serve: bool = False  # a server: started, checked by `check`, stopped

    def matches(self, command: str) -> bool:
        return re.fullmatch(self.pattern, command) is not None


# ---- README claims, each checked against what the command wrote or printed ----------------


def _speedrun(cwd: Path, out: str) -> None:
    # "It prints where the reports are": the run's report and the report card.
    run = cwd / "runs/speedrun"
    assert str(run / "tiny/report.md") in out and str(run / "speedrun.md") in out, out[-2000:]
    card = (run / "speedrun.md").read_text()
    for stage in ("data", "tokenizer", "pretrain", "sample", "sft", "dpo", "evaluate", "deploy"):
        assert re.search(rf"^\| {stage} \| [\d.]+ \|$", card, re.M), stage
    report = (run / "tiny/report.md").read_text()
    assert "loss_curve.png" in report and "## Evaluation" in report


def _experiments_listed(cwd: Path, out: str) -> None:
    names = {p.stem for p in (ROOT / "experiments").glob("*.py") if p.stem != "__init__"}
    listed = {line.split()[0] for line in out.splitlines() if line and not line[0].isspace()}
    assert names <= listed, names - listed


def _param_counts(cwd: Path, out: str) -> None:
    # README's table: llama_1b has 1.24B parameters, moe_tiny 1.97M (0.79M active).
    line = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert re.search(r"\b12[34]\d\.\d\dM params", line["llama_1b"]), line["llama_1b"]
    assert "1.97M params" in line["moe_tiny"] and "0.79M active" in line["moe_tiny"]


def _trained(workdir: str) -> Callable[[Path, str], None]:
    def check(cwd: Path, out: str) -> None:
        run = cwd / workdir
        report = (run / "report.md").read_text()
        assert (run / "loss_curve.png").stat().st_size > 1000
        assert "loss_curve.png" in report
        losses = [
            r["loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if r.get("split", "train") == "train" and "loss" in r
        ]
        assert losses[-1] < losses[0], losses  # the loss falls
        assert re.search(r"validation loss \d", out), out[-2000:]

    return check


def _config_has(workdir: str, **expected) -> Callable[[Path, str], None]:
    def check(cwd: Path, out: str) -> None:
        cfg = json.loads((cwd / workdir / "config.json").read_text())
        for dotted, value in expected.items():
            node = cfg
            for key in dotted.split("."):
                node = node[key]
            assert node == value, (dotted, node, value)

    return check


def _sampled(cwd: Path, out: str) -> None:
    assert "def " in out and len(out.strip()) > 10, out


def _tokenizer(cwd: Path, out: str) -> None:
    assert re.search(r"held-out compression: [\d.]+ bytes/token", out), out
    assert (cwd / "runs/tok").is_dir()


def _curated(cwd: Path, out: str) -> None:
    manifest = json.loads((cwd / "runs/data/manifest.json").read_text())
    assert manifest.get("reconciled") is True, manifest
    assert (cwd / "runs/data/data_report.md").exists()


def _expert_chart(cwd: Path, out: str) -> None:
    assert "expert_load.png" in (cwd / "runs/moe/report.md").read_text()
    assert (cwd / "runs/moe/expert_load.png").exists()


def _imported(cwd: Path, out: str) -> None:
    # "with tokenizer.json as the run's vocabulary"
    cfg = json.loads((cwd / "runs/hf/config.json").read_text())
    assert cfg["tokenizer"]["path"].endswith("tokenizer.json"), cfg["tokenizer"]
    assert (cwd / "runs/hf/checkpoints").is_dir()


def _exported(cwd: Path, out: str) -> None:
    import transformers

    transformers.AutoModelForCausalLM.from_pretrained(str(cwd / "out/hf"))


def _finetuned(workdir: str) -> Callable[[Path, str], None]:
    def check(cwd: Path, out: str) -> None:
        assert (cwd / workdir / "finetune.json").exists()
        assert (cwd / workdir / "report.md").exists()

    return check


def _evaluated(cwd: Path, out: str) -> None:
    results = json.loads((cwd / "runs/tiny/eval/results.json").read_text())
    assert results, results
    assert "## Evaluation" in (cwd / "runs/tiny/report.md").read_text()


def _pod(cwd: Path, out: str) -> None:
    assert "[host 0]" in out and "[host 1]" in out


def _planned(cwd: Path, out: str) -> None:
    assert re.search(r"GiB", out) and re.search(r"batch", out, re.I), out


def _served(with_key: bool) -> Callable[[Path, str, int], None]:
    def check(cwd: Path, out: str, port: int) -> None:
        import openai

        base = f"http://127.0.0.1:{port}"
        page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
        assert "<html" in page.lower()
        if with_key:
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=base + "/v1", api_key="wrong").models.list()
        client = openai.OpenAI(base_url=base + "/v1", api_key="KEY" if with_key else "none")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=8
        )
        assert reply.choices[0].message.content is not None

    return check


STEPS = [
    Step(r"make speedrun", 600, check=_speedrun),
    Step(r"make test", skip="this test runs inside `make test-slow`; CI runs `make test`"),
    Step(r"\.venv/bin/lm experiments", 60, check=_experiments_listed),
    Step(r"\.venv/bin/lm experiments --params", 60, check=_param_counts),
    Step(r"\.venv/bin/lm train --experiment=tiny --workdir=runs/tiny", 120, SHORT + FEW_DOCS,
         _trained("runs/tiny")),
    Step(r"\.venv/bin/lm train --experiment=char_tiny --workdir=runs/char .*", 120, SHORT,
         _trained("runs/char")),
    Step(r"\.venv/bin/lm train --experiment=tiny --workdir=runs/t4 .*", 120, SHORT + FEW_DOCS,
         _config_has("runs/t4", **{"model.num_layers": 4, "optim.lr": 1e-3})),
    Step(r"\.venv/bin/lm sample --workdir=runs/tiny .*", 60, check=_sampled),
    Step(r"\.venv/bin/lm tokenizer train .*", 60, FEW_DOCS, _tokenizer),
    Step(r"\.venv/bin/lm data run --pipeline=stdlib .*", 120, check=_curated),
    Step(r"\.venv/bin/lm data run --pipeline=web .*", 60),
    Step(r"\.venv/bin/lm train --experiment=tiny --workdir=runs/t --config\.data\.source=curated "
         r".*", 120, SHORT + FEW_DOCS, _trained("runs/t")),
    Step(r"\.venv/bin/lm train --experiment=moe_tiny .*", 150, SHORT + FEW_DOCS, _expert_chart),
    Step(r"\.venv/bin/lm convert --from_hf=path/to/hf_model .*", 60, check=_imported),
    Step(r"\.venv/bin/lm train --experiment=runs/hf --workdir=runs/hf", 120, SHORT + FEW_DOCS),
    Step(r"\.venv/bin/lm convert --workdir=runs/hf --to_hf=out/hf", 60, check=_exported),
    Step(r"\.venv/bin/lm quantize .*", 60,
         check=_config_has("runs/tiny-int8", **{"model.weight_bits": 8})),
    Step(r"\.venv/bin/lm train --experiment=tiny --workdir=runs/q8 .*", 120, SHORT + FEW_DOCS),
    Step(r"\.venv/bin/lm finetune --experiment=sft_tiny .*", 90, FINETUNE_SHORT,
         _finetuned("runs/sft")),
    Step(r"\.venv/bin/lm finetune --experiment=lora_tiny .*", 90, FINETUNE_SHORT,
         _finetuned("runs/lora")),
    Step(r"\.venv/bin/lm finetune --experiment=dpo_tiny .*", 120, FINETUNE_SHORT,
         _finetuned("runs/dpo")),
    Step(r"\.venv/bin/lm finetune --experiment=rm_tiny .*", 60, FINETUNE_SHORT,
         _finetuned("runs/rm")),
    Step(r"\.venv/bin/lm finetune --experiment=ppo_tiny .*", 120, FINETUNE_SHORT,
         _finetuned("runs/ppo")),
    Step(r"\.venv/bin/lm finetune --experiment=grpo_tiny .*", 120, FINETUNE_SHORT,
         _finetuned("runs/grpo")),
    Step(r"\.venv/bin/lm finetune --experiment=domain_tiny .*", 150, FINETUNE_SHORT,
         _finetuned("runs/prose")),
    Step(r"\.venv/bin/lm finetune --experiment=dpo --init=hf:/path/to/hf_model .*", 90,
         FINETUNE_SHORT + ("--config.data.batch_size=8", "--config.data.seq_len=128"),
         _finetuned("runs/hf_dpo")),  # the test's Hugging Face model has a 128-token context
    Step(r"\.venv/bin/lm serve --workdir=runs/tiny --adapter=runs/lora", 60,
         check=_served(False), serve=True),
    Step(r"\.venv/bin/lm eval --workdir=runs/tiny --tasks=lm_python,lm_safety", 120,
         ("--limit=20",), _evaluated),
    Step(r"\.venv/bin/lm eval --workdir=runs/tiny --tasks=lm_py_funcname .*", 60),
    Step(r"\.venv/bin/lm eval --workdir=runs/tiny --tasks=hellaswag,arc_easy",
         skip="downloads the datasets from the Hugging Face hub (no internet here)"),
    Step(r"\.venv/bin/lm serve --workdir=runs/tiny --port=8000 --api_key=KEY --slots=8", 60,
         check=_served(True), serve=True),
    Step(r"\.venv/bin/lm pod --processes=2 .*", 180, SHORT + FEW_DOCS, _pod),
    Step(r"\.venv/bin/lm train --experiment=tiny --workdir=gs://my-bucket/runs/tiny", 150,
         SHORT + FEW_DOCS),
    Step(r"\.venv/bin/lm plan --experiment=llama_1b .*", 60, check=_planned),
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prepare(cwd: Path) -> dict[str, str]:
    """What the README's commands assume exists: a text file, a WARC crawl, a Hugging Face
    model directory and a preference file; returns text substitutions for the commands."""
    from lm.convert import parity
    from tests.test_curate_sources import write_warc

    (cwd / "input.txt").write_text(Path(json.__file__).read_text())  # a stdlib module as text
    (cwd / "crawl").mkdir()
    import gzip

    plain = cwd / "crawl" / "a.warc"
    write_warc(str(plain))
    (cwd / "crawl" / "a.warc.gz").write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    hf_dir = cwd / "hf_model"
    parity.tiny_model("llama", str(hf_dir))
    subprocess.run(
        [sys.executable, "-m", "lm.finetune.make_data", "--kind=preferences",
         f"--out={cwd / 'prefs.jsonl'}"],
        check=True, cwd=ROOT, capture_output=True,
    )  # fmt: skip
    return {"path/to/hf_model": str(hf_dir)}


def _run(command: str, step: Step, cwd: Path, env: dict, subs: dict) -> None:
    for old, new in subs.items():
        command = command.replace(old, new)
    argv = shlex.split(command) + list(step.extra)
    if argv[0] == ".venv/bin/lm":
        argv[0] = LM
    if argv[0] == "make":
        argv = ["make", "-C", str(ROOT), *argv[1:], f"WORKDIR={cwd / 'runs/speedrun'}"]
    port = _free_port()
    if step.serve:
        argv = [a for a in argv if not a.startswith("--port=")] + [f"--port={port}"]
    start = time.monotonic()
    if not step.serve:
        proc = subprocess.run(
            argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=step.seconds * 2
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{command}: exit {proc.returncode}\n{out[-3000:]}"
    else:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        try:
            _wait_healthy(port, proc, step.seconds)
            step.check(cwd, "", port)
        finally:
            proc.send_signal(signal.SIGINT)
            out = proc.communicate(timeout=60)[0]
    elapsed = time.monotonic() - start
    assert "Traceback" not in out, f"{command}: a traceback\n{out[-4000:]}"
    assert elapsed <= step.seconds, f"{command}: {elapsed:.0f}s, over its {step.seconds:.0f}s"
    if step.check is not None and not step.serve:
        step.check(cwd, out)


def _wait_healthy(port: int, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited: {proc.stdout.read()[-3000:]}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"the server on port {port} was not healthy in {seconds}s")


def test_every_readme_command_has_exactly_one_step():
    commands = readme_commands()
    assert len(commands) >= 30, commands  # the README's blocks were found
    for command in commands:
        hits = [s.pattern for s in STEPS if s.matches(command)]
        assert len(hits) == 1, f"{command!r} matches {hits or 'no step'}: add one to STEPS"


def test_first_hour(tmp_path, gcs):
    cwd = tmp_path / "newuser"
    cwd.mkdir()
    subs = _prepare(cwd)
    subs["gs://my-bucket/"] = gcs.fresh("firsthour") + "/"
    env = {**os.environ, **gcs.env}
    env.pop("XLA_FLAGS", None)  # a new user's shell has no fake devices
    timings, failures = [], []
    only = os.environ.get("LM_FIRST_HOUR_ONLY")  # a regex, to rerun some commands by hand
    for command in readme_commands():
        step = next(s for s in STEPS if s.matches(command))
        if step.skip or (only and not re.search(only, command)):
            timings.append((command, None, step.skip or "not selected"))
            continue
        start = time.monotonic()
        try:
            _run(command, step, cwd, env, subs)
            note = f"budget {step.seconds:.0f}s"
        except (AssertionError, subprocess.TimeoutExpired) as e:  # go on: report them all
            failures.append(f"{command}\n{e}")
            note = "FAILED"
        timings.append((command, time.monotonic() - start, note))
    total = sum(t for _, t, _ in timings if t)
    print(f"\nfirst hour: {total:.0f}s over {sum(1 for _, t, _ in timings if t)} commands")
    for command, elapsed, note in timings:
        shown = f"{elapsed:7.1f}s" if elapsed is not None else "skipped"
        print(f"{shown}  {command[:90]}  ({note})")
    assert not failures, "\n\n".join(failures)
