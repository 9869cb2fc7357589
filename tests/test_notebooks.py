"""The Colab notebooks (notebooks/*.ipynb) run top to bottom in a real Jupyter kernel (nbclient).

As on a CPU Colab runtime: the kernel is this venv's Python with the repository importable and
one CPU device (not the 8 fake ones `make test` gives this process), in a fresh working
directory. Every cell runs, the install cell included: `lm` imports here, so that cell must do
nothing. Where `lm` is missing (on Colab) it clones the repository and `pip install -e`s it;
that branch runs too, apart, with git and pip replaced by recorders.

02_pretraining runs once per module; 03 and 04 reuse the run it leaves in the shared
LM_NOTEBOOK_RUNS directory (run alone, they train the same run themselves). Not marked slow:
`make test` runs them all.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import resource
import subprocess
import sys
import time

import nbformat
import pytest

from notebooks.execute import NOTEBOOKS, ROOT, execute_notebook

TESTED = {
    "00_quickstart.ipynb",
    "01_data.ipynb",
    "02_pretraining.ipynb",
    "03_finetuning.ipynb",
    "04_eval_and_serving.ipynb",
}
MAX_NOTEBOOK_BYTES = 400_000  # outputs are kept, but no huge ones


def execute(name: str, cwd, runs) -> nbformat.NotebookNode:
    """Runs every cell of notebooks/`name` as `make notebooks` does (notebooks/execute.py),
    timed; a failing cell raises (nbclient's CellExecutionError, with the cell's traceback)."""
    start, cpu = time.perf_counter(), children_cpu_s()
    nb = execute_notebook(NOTEBOOKS / name, cwd, runs)
    print(
        f"{name}: {time.perf_counter() - start:.1f} s wall, {children_cpu_s() - cpu:.1f} s CPU "
        f"(kernel and its subprocesses); cells over 2 s: {slow_cells(nb)}"
    )
    return nb


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def slow_cells(nb) -> dict[str, float]:
    """{cell id: seconds} of the cells that took over 2 s (nbclient's timing metadata)."""
    out = {}
    for cell in code_cells(nb):
        timing = cell.metadata.get("execution", {})
        if "iopub.execute_input" in timing and "shell.execute_reply" in timing:
            began, ended = (
                datetime.datetime.fromisoformat(timing[k].replace("Z", "+00:00"))
                for k in ("iopub.execute_input", "shell.execute_reply")
            )
            if (ended - began).total_seconds() > 2:
                out[cell.id] = round((ended - began).total_seconds(), 1)
    return out


def code_cells(nb) -> list:
    return [c for c in nb.cells if c.cell_type == "code"]


def text(cell) -> str:
    """What a cell printed (stdout and stderr streams) and the plain text of its results."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


def last_output(nb) -> str:
    return text(code_cells(nb)[-1])


def number(pattern: str, output: str) -> float:
    match = re.search(pattern, output)
    assert match, f"{pattern!r} not in the output:\n{output}"
    return float(match.group(1))


def check_install_cell_did_nothing(nb) -> None:
    """The install cell ran and found the repository's `lm` (no clone, no pip)."""
    out = text(code_cells(nb)[0])
    assert f"lm is already importable ({ROOT / 'lm'}): nothing to install" in out, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """LM_NOTEBOOK_RUNS of every notebook in this module."""
    return tmp_path_factory.mktemp("notebook_runs")


@pytest.fixture(scope="module")
def pretraining(runs, tmp_path_factory):
    """02_pretraining, executed once: its run (runs/tiny) is the one 03 and 04 start from."""
    return execute("02_pretraining.ipynb", tmp_path_factory.mktemp("nb02"), runs)


@pytest.mark.parametrize("name", sorted(TESTED))
def test_committed_notebook_carries_its_outputs_and_installs_like_colab(name):
    # Saved with outputs (`make notebooks`), so a reader on GitHub sees the results.
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    first, install = nb.cells[0], code_cells(nb)[0]
    assert first.cell_type == "markdown" and "CPU Colab runtime" in first.source
    assert nb.cells[1] is install, "the install cell comes right after the introduction"
    for needed in ("import lm", "except ImportError", "'git', 'clone'", "'pip', 'install'", "'-e'"):
        assert needed in install.source, f"install cell lacks {needed!r}"
    cells = code_cells(nb)
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), "run top to bottom once: make notebooks"
    outputs = [out for cell in cells for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert sum(1 for cell in cells if cell.outputs) >= len(cells) / 2, "outputs missing"
    assert "nothing to install" in text(install)
    assert (NOTEBOOKS / name).stat().st_size < MAX_NOTEBOOK_BYTES
    printed = "".join(map(text, cells))
    assert "/tmp/" not in printed and str(ROOT) not in printed, "machine paths left in outputs"


def images(nb) -> list[str]:
    """The base64 PNGs the notebook displays."""
    return [
        out.data["image/png"]
        for cell in code_cells(nb)
        for out in cell.outputs
        if out.output_type in ("display_data", "execute_result") and "image/png" in out.data
    ]


def markdown(nb) -> str:
    return "".join(
        out.data.get("text/markdown", "")
        for cell in code_cells(nb)
        for out in cell.outputs
        if out.output_type == "display_data"
    )


def check_quickstart_report(nb) -> None:
    """The report's loss curve is shown in the notebook (not a link to a file beside the run),
    and its samples section has samples."""
    assert images(nb), "no image output: the loss curve is not shown"
    report = markdown(nb)
    assert "## Samples" in report and "_No samples._" not in report
    assert "](loss_curve.png)" not in report
    samples = report.split("## Samples", 1)[1]
    assert "def " in samples and "import " in samples


def test_committed_quickstart_shows_the_loss_curve_and_samples():
    check_quickstart_report(nbformat.read(NOTEBOOKS / "00_quickstart.ipynb", as_version=4))


# Runs an install cell where `lm` does not import, with git and pip replaced by recorders (no
# network, nothing installed): what would run on Colab, and that `lm` imports after it.
FAKE_COLAB = """
import json, os, subprocess, sys
calls = []

def run(cmd, check=False, **kwargs):
    calls.append(cmd)
    if cmd[:2] == ['git', 'clone']:
        os.makedirs(cmd[-1])
        open(os.path.join(cmd[-1], 'setup.py'), 'w').close()
    elif cmd[1:4] == ['-m', 'pip', 'install']:
        del sys.modules['lm']  # installed: importable from now on

subprocess.run = run
sys.modules['lm'] = None  # `import lm` raises ImportError, as on a fresh Colab runtime
exec(compile(open(sys.argv[1]).read(), 'install cell', 'exec'))
print(json.dumps(calls))
"""


@pytest.mark.parametrize("name", sorted(TESTED))
@pytest.mark.parametrize("checkout", [False, True], ids=["colab", "checkout"])
def test_install_cell_clones_and_installs_where_lm_is_missing(name, checkout, tmp_path):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    cell = tmp_path / "cell.py"
    cell.write_text(code_cells(nb)[0].source)
    if checkout:  # the notebook opened inside a clone of the repository
        (tmp_path / "setup.py").write_text("")
        (tmp_path / "lm").mkdir()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", FAKE_COLAB, str(cell)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    *printed, calls = proc.stdout.strip().splitlines()
    src = "." if checkout else "lm-repo"
    extra = "[eval]" if "eval" in name else ""
    pip = [sys.executable, "-m", "pip", "install", "-q", "-e", src + extra]
    url = re.search(r"REPO_URL = '([^']+)'", cell.read_text()).group(1)
    clone = [] if checkout else [["git", "clone", "--depth=1", url, "lm-repo"]]
    assert json.loads(calls) == [*clone, pip]
    assert printed == [f"installed lm from {tmp_path / src}"]


def test_every_notebook_is_executed_here():
    assert {p.name for p in NOTEBOOKS.glob("*.ipynb")} == TESTED


def test_00_quickstart(runs, tmp_path):
    nb = execute("00_quickstart.ipynb", tmp_path, runs)
    check_install_cell_did_nothing(nb)
    check_quickstart_report(nb)
    assert (runs / "quickstart" / "report.md").exists()
    assert number(r"validation loss ([\d.]+) at step 30", last_output(nb)) < 7.0


def test_01_data(runs, tmp_path):
    nb = execute("01_data.ipynb", tmp_path, runs)
    check_install_cell_did_nothing(nb)
    manifest = json.loads((runs / "data" / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["reconciled"] is True
    assert counts["inputs"] == 300 and 0 < counts["kept"] < counts["inputs"]
    assert counts["kept"] + counts["rejected"] == counts["inputs"]
    assert sum(counts["by_reason"].values()) == counts["rejected"]
    assert (runs / "data" / "data_report.md").exists()
    assert (runs / "data_packed" / "tokenizer" / "spm.model").exists()
    out = last_output(nb)
    assert f"curated: 300 documents in, {counts['kept']} kept, " in out
    assert "(reconciled: True)" in out
    # A 2048-piece BPE on Python source: well over 2 bytes a token on held-out modules.
    assert number(r"([\d.]+) bytes/token held out", out) > 2.0
    assert number(r"packed: (\d+) train rows", out) > 100
    assert number(r"(\d+) validation rows", out) > 0
    plans = list((runs / "data_packed" / "data_cache").glob("*/plan.json"))
    assert len(plans) == 1


def test_02_pretraining(pretraining, runs):
    check_install_cell_did_nothing(pretraining)
    workdir = runs / "tiny"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if r["split"] == "train"]
    validation = [r["loss"] for r in records if r["split"] == "validation"]
    assert len(train) == 12 and len(validation) == 2
    assert train[-1] < train[0] - 1.0, train
    assert validation[-1] < validation[0], validation
    out = last_output(pretraining)
    first = number(r"train loss ([\d.]+) at step 5 ->", out)
    last = number(r"-> ([\d.]+) at step 60", out)
    assert first == pytest.approx(train[0], abs=1e-3) and last == pytest.approx(train[-1], abs=1e-3)
    assert number(r"validation loss ([\d.]+)", out) < 7.0
    assert (workdir / "report.md").exists() and (workdir / "loss_curve.png").exists()
    assert "--- 'def ' (checkpoint 60)" in "".join(map(text, code_cells(pretraining)))


def test_03_finetuning(pretraining, runs, tmp_path):
    nb = execute("03_finetuning.ipynb", tmp_path, runs)
    check_install_cell_did_nothing(nb)
    assert f"reusing the pretrained run in {runs / 'tiny'}" in "".join(map(text, code_cells(nb)))
    sft = json.loads((runs / "sft" / "finetune.json").read_text())
    dpo = json.loads((runs / "dpo" / "finetune.json").read_text())
    assert sft["method"] == "sft" and sft["init"] == str(runs / "tiny")
    assert dpo["method"] == "dpo" and dpo["init"] == str(runs / "sft")
    assert sft["validation"]["loss"] < sft["validation_before"]["loss"] - 0.5
    before, after = dpo["validation_before"], dpo["validation"]
    assert after["loss"] < before["loss"]
    assert after["rewards/margin"] > 0.1 > before["rewards/margin"]
    assert after["rewards/accuracy"] >= 0.75  # before: policy == reference, margins ~0
    out = last_output(nb)
    assert number(r"SFT: held-out loss [\d.]+ -> ([\d.]+)", out) == pytest.approx(
        sft["validation"]["loss"], abs=1e-3
    )
    assert number(r"reward margin -?[\d.]+ -> (-?[\d.]+)", out) == pytest.approx(
        after["rewards/margin"], abs=1e-3
    )
    # SFT teaches the answers' form: `def name(...):`.
    assert number(r"SFT answers in the signature form: (\d) of 3", out) >= 2


def test_04_eval_and_serving(pretraining, runs, tmp_path):
    nb = execute("04_eval_and_serving.ipynb", tmp_path, runs)
    check_install_cell_did_nothing(nb)
    assert f"reusing the pretrained run in {runs / 'tiny'}" in "".join(map(text, code_cells(nb)))
    results = json.loads((runs / "tiny" / "eval" / "results.json").read_text())
    assert set(results["results"]) == {"lm_py_funcname", "lm_py_perplexity"}
    assert results["lm_settings"]["limit"] == 8 and results["lm_step"] == 60
    assert 0.0 <= results["results"]["lm_py_funcname"]["acc,none"] <= 1.0
    assert 0.0 < results["results"]["lm_py_perplexity"]["bits_per_byte,none"] < 8.0
    served = "".join(map(text, code_cells(nb)[-2:]))
    assert "models: ['tiny']" in served
    out = last_output(nb)
    assert "/health was 200 while serving; server stopped: True" in out
    assert number(r"chat answered \((\d+) tokens\)", out) > 0
    assert number(r"completion answered \((\d+) tokens\)", out) > 0
