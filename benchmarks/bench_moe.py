"""moe_tiny training tokens/s: dropless vs capacity dispatch, and the dense model with the same
active width, measured back to back through the real `lm train` loop.

moe_tiny routes each token to 2 of 8 SwiGLU experts of width 256, so a token's active MLP is
512 wide: the dense reference is the same model with one SwiGLU MLP of d_ff 512 (tiny's d_ff).
The MoE rows pay for the router, the sort / scatter of assignments and the per-expert matmuls;
capacity mode computes capacity_factor x the active FLOPs in fixed slots and drops overflow.
"""

from __future__ import annotations

import os

from benchmarks.run import train_throughput

STEPS = 200
# Same corpus, tokenizer, shape and schedule for every row; only the MLP differs.
COMMON = ["--config.model.dtype=float32", "--config.train.steps_per_call=10"]
VARIANTS = {
    "moe dropless (tiled grouped matmul)": ["--config.model.grouped_matmul=tiled"],
    "moe dropless (jax.lax.ragged_dot)": ["--config.model.grouped_matmul=ragged_dot"],
    "moe capacity (factor 1.25)": [
        "--config.model.moe_dispatch=capacity",
        "--config.model.capacity_factor=1.25",
    ],
    "dense, same active width (d_ff 512)": [
        "--config.model.num_experts=0",
        "--config.model.d_ff=512",
    ],
}


def moe_rows(tmp: str, steps: int = STEPS) -> list[dict]:
    """One row per variant: median tokens/s over the logged windows after the first."""
    from lm.config import get_config
    from lm.models.transformer import experiment_param_counts

    rows = []
    for name, overrides in VARIANTS.items():
        workdir = os.path.join(tmp, name.split()[0] + str(len(rows)))
        # One data cache for all rows: the packing is done once, outside the timed windows.
        flags = [*COMMON, *overrides, f"--config.data.cache_dir={os.path.join(tmp, 'cache')}"]
        result = train_throughput("moe_tiny", flags, steps, workdir)
        total, active = experiment_param_counts(get_config("moe_tiny", overrides))
        rows.append(
            {
                "variant": name,
                "params": f"{total / 1e6:.2f}M ({active / 1e6:.2f}M active)",
                "tokens/s": round(result["median_tokens_per_s"]),
                "windows": result["windows"],
            }
        )
    base = rows[-1]["tokens/s"]
    for row in rows:
        row["vs dense"] = f"{row['tokens/s'] / base:.2f}x"
    return rows
