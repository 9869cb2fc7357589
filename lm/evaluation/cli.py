"""`lm eval --workdir=W --tasks=a,b [...]`: lm-evaluation-harness tasks on a run's checkpoint.

lm-eval's own evaluator (`simple_evaluate`) runs the tasks with our registered model
(harness.py), so metrics, standard errors, acc_norm and rolling perplexities are lm-eval's.
Tasks come from lm-eval's TaskManager with lm/evaluation/tasks/ (the offline `lm_python`
group and the safety tasks) on its include path, plus `--include_path=DIR`; any built-in
lm-eval task name works too, but those download their data: datasets are read offline unless
HF_DATASETS_OFFLINE=0 is set. When every requested name is one of ours the built-in index
(~15k tasks, seconds to scan) is skipped.

Writes W/eval/results.json (lm-eval's results, JSON-safe, with the step and the settings),
W/eval/results.md (the table) and an "## Evaluation" section in W/report.md; prints the table.
Each phase (finding and loading tasks, restoring the checkpoint, scoring and generating, with
counts) is an `lm.stages` stage: a live line on a terminal's stderr, nothing otherwise.
`run_eval(...)` is the same for Python callers (the speedrun, tests).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Any

from lm import stages, storage
from lm.errors import ConfigError, LMError

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks")
DEFAULT_BOOTSTRAP_ITERS = 1000


def _quiet_lm_eval() -> None:
    """Offline datasets, no bootstrap worker processes (a fork of a JAX process), and only
    lm-eval's errors in the log."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("DISABLE_MULTIPROC", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)


def parse_tasks(tasks: str | list[str]) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ConfigError("--tasks needs at least one task name, e.g. --tasks=lm_python")
    return names


def task_manager(names: list[str], include_path: str | None = None, metadata=None):
    """A TaskManager that knows every name in `names` (a glob matches too); the built-in
    index is only scanned when some name is not one of ours. Unknown names are an LMError.
    `metadata` reaches every task's options (the safety tasks read the run's tokenizer from
    its `workdir`, to build chat prompts)."""
    from lm_eval.tasks import TaskManager

    paths = [TASKS_DIR]
    if include_path:
        if not os.path.isdir(include_path):
            raise ConfigError(f"--include_path={include_path} is not a directory")
        paths.append(include_path)
    local = TaskManager(include_defaults=False, include_path=paths, metadata=metadata)
    missing = [n for n in names if not local.match_tasks([n])]
    if not missing:
        return local
    # A built-in name is spelled out in some lm-eval YAML (task:, group:, tag:); a quick byte
    # search (~1 s) rules out a typo before the full index is built (~10 s).
    unknown = _absent_from_builtin_yaml(missing)
    if not unknown:
        full = TaskManager(include_path=paths, metadata=metadata)
        unknown = [n for n in missing if not full.match_tasks([n])]
    if unknown:
        raise LMError(
            f"unknown task {', '.join(repr(n) for n in unknown)}; the offline tasks are "
            f"{', '.join(local.all_tasks)} (or any lm-eval task; --include_path=DIR adds yours)"
        )
    return full


def _absent_from_builtin_yaml(names: list[str]) -> list[str]:
    """The names (globs excluded) that occur in no YAML file of lm-eval's built-in tasks."""
    import lm_eval.tasks

    left = {n for n in names if not any(ch in n for ch in "*?[")}
    root = os.path.dirname(lm_eval.tasks.__file__)
    for dirpath, _, files in os.walk(root):
        for name in files:
            if not left:
                return []
            if name.endswith(".yaml"):
                with open(os.path.join(dirpath, name), "rb") as f:
                    text = f.read()
                left = {n for n in left if n.encode() not in text}
    return [n for n in names if n in left]


def _load_tasks(manager, names: list[str]) -> list:
    """The requested tasks/groups, loaded (their data read) up front, so a task whose data
    cannot be had (offline, a bad file) is a one-line error rather than a traceback."""
    expanded = []
    for name in names:
        expanded += [m for m in manager.match_tasks([name]) if m not in expanded]
    try:
        loaded = manager.load(expanded)
    except (KeyError, ValueError, OSError, ConnectionError, ImportError) as e:
        hint = ""
        if os.environ.get("HF_DATASETS_OFFLINE") == "1":
            hint = " (lm eval reads datasets offline; HF_DATASETS_OFFLINE=0 allows downloads)"
        raise LMError(f"could not load task(s) {', '.join(expanded)}: {e}{hint}") from None
    children = {child for kids in loaded["group_map"].values() for child in kids}
    top = [g for name, g in loaded["groups"].items() if name not in children]
    return top + [t for name, t in loaded["tasks"].items() if name not in children]


def _model(workdir_or_run: Any, step: int | None, batch_size: int, slots: int, seed: int):
    from lm.evaluation.harness import LMEvalModel

    if isinstance(workdir_or_run, LMEvalModel):
        return workdir_or_run
    kwargs = dict(batch_size=batch_size, slots=slots, seed=seed)
    if isinstance(workdir_or_run, (str, os.PathLike)):
        return LMEvalModel(workdir=os.fspath(workdir_or_run), step=step, **kwargs)
    return LMEvalModel.from_run(workdir_or_run, **kwargs)  # a RestoredRun


def run_eval(
    workdir_or_run: Any,
    tasks: str | list[str],
    *,
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 16,
    step: int | None = None,
    include_path: str | None = None,
    seed: int = 0,
    slots: int = 8,
    output: str | None = None,
    workdir: str | None = None,
    log_samples: bool = False,
    bootstrap_iters: int = DEFAULT_BOOTSTRAP_ITERS,
) -> dict:
    """Runs lm-eval's evaluator on a workdir (str), a RestoredRun or an LMEvalModel and
    returns its results dict (JSON-safe; "samples" per doc when `log_samples`).

    Files are written for a workdir (or when `workdir=` names one): the results JSON
    (`output`, default W/eval/results.json), the table beside it (.md) and report.md's
    "## Evaluation" section.
    """
    _quiet_lm_eval()
    with stages.stage("starting lm-eval"):
        import jax
        import lm_eval
        import lm_eval.evaluator

        from lm.evaluation import harness, report  # noqa: F401 - registers the `lm` model

    names = parse_tasks(tasks)
    if isinstance(workdir_or_run, (str, os.PathLike)):
        workdir = workdir or os.fspath(workdir_or_run)
        if not storage.exists(storage.join(workdir, "config.json")):
            raise LMError(f"{workdir} is not the workdir of an `lm train` run (no config.json)")
    metadata = {"workdir": os.fspath(workdir)} if workdir else None
    with stages.stage("finding the tasks"):
        manager = task_manager(names, include_path, metadata)
    with stages.stage("restoring the checkpoint"):
        model = _model(workdir_or_run, step, batch_size, slots, seed)
    with stages.stage("loading the tasks' data"):
        loaded = _load_tasks(manager, names)
    model.requests_ended = None
    model.preparing()
    try:
        raw = lm_eval.simple_evaluate(
            model=model,
            tasks=loaded,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=bootstrap_iters,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    finally:
        model.end_preparing()
    if model.requests_ended is not None:  # metrics and bootstrap stderrs, after our requests
        stages.record("computing the metrics (lm-eval)", time.monotonic() - model.requests_ended)
    samples = raw.pop("samples", None)
    results = report.json_safe(raw)
    results["lm_step"] = model.parts.step
    results["lm_workdir"] = workdir
    results["lm_settings"] = {
        "tasks": names,
        "limit": limit,
        "num_fewshot": num_fewshot,
        "batch_size": model.batch_size,
        "seed": seed,
    }
    if workdir and jax.process_index() == 0:
        json_path = output or storage.join(workdir, "eval", "results.json")
        report.write_outputs(results, json_path, storage.join(workdir, "report.md"))
        if samples is not None:
            lines = [
                json.dumps({"task": task, **doc}, default=str)
                for task, docs in samples.items()
                for doc in docs
            ]
            samples_path = storage.join(os.path.dirname(json_path), "samples.jsonl")
            storage.write_text(samples_path, "\n".join(lines) + "\n")
    if samples is not None:
        results["samples"] = report.json_safe(samples)
    return results


def _limit(text: str) -> float | int:
    """--limit: a number of docs per task, or a fraction of each task (< 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return int(value) if value >= 1 and value == int(value) else value


class _Parser(argparse.ArgumentParser):
    """argparse whose mistakes are ConfigErrors (one line, exit 2 via the CLI), not exits."""

    def error(self, message: str):
        raise ConfigError(f"lm eval: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lm eval", description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="an `lm train` run directory")
    p.add_argument("--tasks", required=True, help="comma-separated task or group names")
    p.add_argument("--limit", type=_limit, default=None, help="docs per task (or a fraction)")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples")
    p.add_argument("--batch_size", type=int, default=16, help="rows per scoring forward pass")
    p.add_argument("--slots", type=int, default=8, help="generation engine decode slots")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--output", default=None, help="results JSON path (default W/eval/...)")
    p.add_argument("--include_path", default=None, help="a directory of your own task YAMLs")
    p.add_argument("--seed", type=int, default=0, help="seed of few-shot picks and sampling")
    p.add_argument("--log_samples", action="store_true", help="also write eval/samples.jsonl")
    p.add_argument("--bootstrap_iters", type=int, default=DEFAULT_BOOTSTRAP_ITERS)
    return p


def main(argv: list[str]) -> int:
    """`lm eval ...` (the arguments after `eval`). User mistakes raise LMError (one line)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's per-task progress bars; read at import
    args = build_parser().parse_args(argv)
    for flag in ("batch_size", "slots"):
        if getattr(args, flag) < 1:
            raise ConfigError(f"--{flag} must be at least 1")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError("--num_fewshot must be >= 0")
    if not storage.exists(storage.join(args.workdir, "config.json")):
        raise LMError(f"--workdir={args.workdir} is not an `lm train` run (no config.json)")
    from lm.evaluation import report

    results = run_eval(
        args.workdir,
        args.tasks,
        limit=args.limit,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        step=args.step,
        include_path=args.include_path,
        seed=args.seed,
        slots=args.slots,
        output=args.output,
        log_samples=args.log_samples,
        bootstrap_iters=args.bootstrap_iters,
    )
    print(report.markdown_table(results), end="")
    json_path = args.output or storage.join(args.workdir, "eval", "results.json")
    report_path = storage.join(args.workdir, "report.md")
    print(f"wrote {json_path} and the Evaluation section of {report_path}", file=sys.stderr)
    return 0
