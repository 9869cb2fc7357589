"""The end of a run: samples from the final parameters and the report.

Every host samples (the parameters are sharded across hosts, so generation is a collective);
only the primary host writes the report.
"""

from __future__ import annotations

import time
from typing import Any

import jax

from lm import stages
from lm.stages import stage
from lm.training.report import write_report


def finish_run(
    cfg, workdir: str, trainer, params, model_cfg, vocab, clock: tuple[int, float] | None = None
) -> dict[str, Any]:
    """{"samples": [(prompt, text)], "report": path or None}.

    `clock` is (index of the run's first phase in `stages.timings()`, the run's start time): the
    report names those phases and the whole command's wall time."""
    samples = []
    if cfg.train.sample_prompts and cfg.data.objective == "lm":
        from lm.inference.sample import generate_text

        prompts = cfg.train.sample_prompts.split("|")
        with stage("sampling from the final model"):
            texts = generate_text(
                trainer.graphdef,
                params,
                model_cfg,
                vocab,
                prompts,
                max_new_tokens=cfg.train.sample_tokens,
                temperature=0.8,
                top_k=40,
                seed=cfg.seed,
            )
        samples = list(zip(prompts, texts))
    report = None
    if jax.process_index() == 0:
        first, started = clock if clock is not None else (0, None)
        report = write_report(
            workdir,
            cfg,
            samples=samples,
            phases=stages.timings()[first:],
            command_s=None if started is None else time.time() - started,
        )
    return {"samples": samples, "report": report}
