"""The end of a run: samples from the final parameters and the report.

Every host samples (the parameters are sharded across hosts, so generation is a collective);
only the primary host writes the report.
"""

from __future__ import annotations

from typing import Any

import jax

from lm.training.report import write_report


def finish_run(cfg, workdir: str, trainer, params, model_cfg, vocab) -> dict[str, Any]:
    """{"samples": [(prompt, text)], "report": path or None}."""
    samples = []
    if cfg.train.sample_prompts and cfg.data.objective == "lm":
        from lm.inference.sample import generate_text

        prompts = cfg.train.sample_prompts.split("|")
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
    report = write_report(workdir, cfg, samples=samples) if jax.process_index() == 0 else None
    return {"samples": samples, "report": report}
