"""Runs the notebooks top to bottom and saves them with their outputs (`make notebooks`).

Why saved with outputs: a reader on GitHub (or Colab before running anything) sees the results,
the loss curve included. Each notebook runs in a real Jupyter kernel (nbclient) as on a CPU
Colab runtime: this venv's Python with the repository importable, one CPU device, a fresh
working directory. All of them share one fresh runs directory, in order, so 03 and 04 reuse the
run 02 trains (as they do on Colab) and no earlier run is resumed.

What is saved is tidied, nothing essential stripped: the machine's paths (the temporary working
directory, the checkout) are cut from the outputs, and nbclient's per-cell timing metadata is
dropped so a re-run changes only what the notebook shows. tests/test_notebooks.py executes the
same way (`execute_notebook`) and checks that the committed notebooks carry outputs.

    python notebooks/execute.py [NAME.ipynb ...]     # default: every notebook, in order
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile

import nbformat
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 600  # per cell; a whole notebook takes 0.5 to 3 minutes on 2 busy cores


def kernel_env(runs) -> dict[str, str]:
    """The kernel's environment: the shared runs directory, the repository importable, one
    CPU device (not the fake devices a test process may ask for)."""
    env = dict(os.environ)
    env["LM_NOTEBOOK_RUNS"] = str(runs)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "host_platform_device_count" not in f)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return env


def execute_notebook(path, cwd, runs) -> nbformat.NotebookNode:
    """Runs every cell of the notebook at `path` in a new kernel started in `cwd`; a failing
    cell raises (nbclient's CellExecutionError, with the cell's traceback)."""
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(cwd)}},
    )
    client.execute(env=kernel_env(runs))  # returns once the kernel has exited
    return nb


def tidy(nb: nbformat.NotebookNode, *prefixes: str) -> nbformat.NotebookNode:
    """Cuts each of `prefixes` (absolute directories) from the text outputs and drops the
    per-cell timing metadata; images and results are kept as they are."""
    cuts = [p.rstrip(os.sep) + os.sep for p in prefixes if p]
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                out.text = _cut(out.text, cuts)
            for kind, value in out.get("data", {}).items():
                if kind.startswith("text/") and isinstance(value, str):
                    out.data[kind] = _cut(value, cuts)
    return nb


def _cut(text: str, prefixes: list[str]) -> str:
    for prefix in prefixes:
        text = text.replace(prefix, "")
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebook file names (default: all)")
    args = parser.parse_args(argv)
    names = args.names or sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    with tempfile.TemporaryDirectory(prefix="lm-notebooks-") as tmp:
        runs = pathlib.Path(tmp) / "runs"
        runs.mkdir()
        for name in names:
            cwd = pathlib.Path(tmp) / name.removesuffix(".ipynb")
            cwd.mkdir()
            print(f"executing {name} ...", flush=True)
            nb = execute_notebook(NOTEBOOKS / name, cwd, runs)
            nbformat.write(tidy(nb, str(cwd), tmp, str(ROOT)), NOTEBOOKS / name)
            size = (NOTEBOOKS / name).stat().st_size
            print(f"wrote notebooks/{name} with its outputs ({size / 1024:.0f} KiB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
