"""Notebooks run top to bottom (the install cell is skipped: the test runs inside the venv)."""

import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    nb = json.loads((ROOT / "notebooks" / "quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for source in cells:
        if "pip" in source and "install" in source:
            continue
        exec(compile(source, "quickstart.ipynb", "exec"), namespace)
    assert os.path.exists(tmp_path / "runs" / "notebook" / "report.md")
    assert namespace["summary"]["validation"]["loss"] < 7.0
