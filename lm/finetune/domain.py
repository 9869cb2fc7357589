"""Domain adaptation: continued pretraining of a checkpoint on a new corpus, with an optional
replay mixture of the original data, and what was learned and forgotten measured side by side.

The data is `lm train`'s (`data.source=...` for the domain alone, or `data.source=mixture`
with the domain and a replay component; `finetune.domain` names the domain component) and so
is the loop (`lm.training.loop.train` with the init run's params). Measured before and after:
the validation loss on the domain's held-out split (learned), each mixture component's own
validation loss, and `finetune.eval_tasks` through `lm eval` on the init model and on the
result (kept or forgotten: e.g. `lm_py_perplexity` when adapting a code model to prose).
"""

from __future__ import annotations

import json
from typing import Any

import jax

from lm import storage
from lm.training.loop import Preempted, train
from lm.training.report import write_report_section
from lm.training.restore import RestoredRun


def domain_loss(validation: dict, domain: str) -> float:
    """The validation loss on the domain: its mixture component's, or the only source's."""
    return validation.get(f"loss/{domain}", validation["loss"]) if domain else validation["loss"]


def eval_tasks(run_or_workdir: Any, cfg, out: str) -> dict[str, dict]:
    """`finetune.eval_tasks` through lm-eval: task -> {metric: value}."""
    from lm.evaluation.cli import run_eval

    ft = cfg.finetune
    results = run_eval(
        run_or_workdir, ft.eval_tasks, limit=ft.eval_limit or None, output=out, seed=cfg.seed
    )
    return {
        task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, float)}
        for task, metrics in results["results"].items()
    }


def adapt(cfg, workdir: str, base: RestoredRun, stop) -> dict[str, Any]:
    """Continued pretraining of `base` with `cfg.data`; returns the summary with
    "before" / "after" measurements (also written to finetune.json and report.md)."""
    ft = cfg.finetune
    before_tasks = {}
    if ft.eval_tasks:
        before_tasks = eval_tasks(base, cfg, storage.join(workdir, "eval", "before.json"))
    summary = train(cfg, workdir, initial_params=base.params)
    after_tasks = eval_tasks(workdir, cfg, None) if ft.eval_tasks else {}
    before, after = summary["validation_before"], summary["validation"]
    rows = [
        ("domain validation loss", domain_loss(before, ft.domain), domain_loss(after, ft.domain))
    ]
    rows += [
        (f"validation {k}", before[k], after[k])
        for k in sorted(after)
        if k.startswith("loss/") and k in before
    ]
    rows += [
        (f"{task} {metric}", value, after_tasks.get(task, {}).get(metric))
        for task, metrics in before_tasks.items()
        for metric, value in sorted(metrics.items())
        if "stderr" not in metric
    ]
    summary.update(before_tasks=before_tasks, after_tasks=after_tasks, comparison=rows)
    summary["lines"] = [  # before -> after, as `lm finetune` prints every method's metrics
        f"{name:40s} {b:10.4f} -> {a:10.4f}" for name, b, a in rows if a is not None
    ]
    if jax.process_index() == 0:
        record = {
            "method": "lm",
            "init": ft.init,
            "steps": cfg.train.steps,
            "validation_before": before,
            "validation": after,
            "before_tasks": before_tasks,
            "after_tasks": after_tasks,
            "comparison": [{"measure": n, "before": b, "after": a} for n, b, a in rows],
        }
        storage.write_text(storage.join(workdir, "finetune.json"), json.dumps(record, indent=2))
        _report_section(workdir, rows)
    if stop.agreed():
        raise Preempted(stop.signum)
    return summary


def _report_section(workdir: str, rows: list) -> None:
    """The "finetune" section of report.md (after `lm train`'s training section): each
    measure before and after."""
    lines = [
        "## Domain adaptation: learned and forgotten",
        "",
        "| measure | before (init) | after | change |",
        "|---|---|---|---|",
    ]
    for name, b, a in rows:
        if a is None:
            continue
        lines.append(f"| {name} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")
    write_report_section(workdir, "finetune", "\n".join(lines))
