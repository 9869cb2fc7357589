"""GRPO rollouts with the engine's prefill budget at one chunk (what serving uses) vs all the
batch's prompts (what `RolloutSource` uses), same engine settings, interleaved rounds.

    PYTHONPATH=. .venv/bin/python -m benchmarks.bench_rollout_prefill --init=<an sft_tiny run>
"""

import argparse
import statistics
import time

import numpy as np

from lm import sharding
from lm.config import get_config
from lm.finetune import make_data
from lm.finetune.objectives import make_objective
from lm.finetune.policy import initial_params
from lm.finetune.rollout import RolloutSource
from lm.finetune.run import adopt_base, load_vocab_of
from lm.inference.engine import Engine
from lm.training.restore import restore_run
from lm.training.train_step import Trainer

parser = argparse.ArgumentParser()
parser.add_argument("--init", required=True)
init = parser.parse_args().init
cfg = get_config("grpo_tiny", [f"--config.finetune.init={init}"])
base = restore_run(init)
adopt_base(cfg, base)
tr = Trainer(cfg, base.model_cfg, sharding.make_mesh(cfg.mesh), make_objective(cfg))
params, _ = initial_params(tr, base.params)
items, _ = make_data.load_prompt_data("stdlib:verifiable", 500, 0)
src = RolloutSource(cfg, tr, load_vocab_of(cfg), items, len(items))
src.start(params)
engines = {
    "budget=chunk (before)": Engine(
        src.policy.lm_graphdef,
        src.policy.lm_params(params),
        tr.model_cfg,
        src.vocab,
        slots=32,
        max_queue=200,
    ),
    "budget=all prompts (now)": src.engine,
}
rng = np.random.default_rng(0)
times = {k: [] for k in engines}
toks = {k: [] for k in engines}
for r in range(6):
    idx = [i for i in src._draw(rng, 8) for _ in range(4)]
    for k, e in engines.items() if r % 2 == 0 else reversed(list(engines.items())):
        src.engine = e
        t = time.perf_counter()
        p, c, _ = src.sample(params, idx, seed=r)
        dt = time.perf_counter() - t
        if r:
            times[k].append(dt)
            toks[k].append(sum(map(len, c)))
for k in engines:
    ms = statistics.median(times[k]) * 1000
    rate = statistics.median([a / b for a, b in zip(toks[k], times[k])])
    print(f"{k}: median {ms:.0f} ms a rollout, {rate:.0f} completion tok/s")
