"""Weight-only quantization of a trained `tiny`: checkpoint size on disk and validation loss of
the fp32 params, their `lm quantize` int8 (per channel) and int4 (grouped) copies, and, for
reference, the same run trained with qwix int8 matmuls (`quant.training=int8`).

Sizes are what `du` would say of each params-only orbax checkpoint (the fp32 one written the
same way `lm quantize` writes its own, so metadata and zstd are alike; the run's checkpoint
also holds Adam's two moments and would flatter the ratio 3x). Every loss is over the same
validation batches: the quantized workdirs read the source run's packs.
"""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.run import train_throughput

STEPS = 300
INT4_GROUP = 32
COMMON = ["--config.model.dtype=float32", "--config.train.steps_per_call=10"]


def _disk_bytes(root: str) -> int:
    return sum(
        os.path.getsize(os.path.join(d, name)) for d, _, names in os.walk(root) for name in names
    )


def _lm(*args: str) -> None:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run([sys.executable, "-m", "lm.cli", *args], check=True, env=env)


def _fp32_params_bytes(workdir: str, out: str) -> tuple[int, int]:
    """(on-disk bytes of a params-only checkpoint of the run's newest step, step)."""
    from lm.quantize.weights import save_params
    from lm.training.restore import restore_run

    run = restore_run(workdir)
    return _disk_bytes(save_params(out, run.step, run.params)), run.step


def quant_rows(tmp: str, steps: int = STEPS) -> list[dict]:
    """One row per variant: params bytes on disk, ratio to fp32, validation loss and its
    relative change from fp32."""
    from lm.training.restore import evaluate_workdir

    fp32 = os.path.join(tmp, "fp32")
    train_throughput("tiny", COMMON, steps, fp32)
    # Same seed, data (the fp32 run's packs and tokenizer) and schedule, int8 matmuls.
    shared = [
        f"--config.data.cache_dir={os.path.join(fp32, 'data_cache')}",
        f"--config.tokenizer.path={os.path.join(fp32, 'tokenizer', 'spm.model')}",
    ]
    qat = os.path.join(tmp, "qat")
    train_throughput("tiny", [*COMMON, *shared, "--config.quant.training=int8"], steps, qat)
    int8, int4 = os.path.join(tmp, "int8"), os.path.join(tmp, "int4")
    _lm("quantize", f"--workdir={fp32}", f"--out={int8}")
    _lm("quantize", f"--workdir={fp32}", f"--out={int4}", "--bits=4", f"--group_size={INT4_GROUP}")

    fp32_bytes, step = _fp32_params_bytes(fp32, os.path.join(tmp, "fp32_params"))
    base = evaluate_workdir(fp32)["loss"]
    rows = [("fp32 params", fp32_bytes, base)]
    for name, workdir in (("int8 per channel", int8), (f"int4, {INT4_GROUP} per scale", int4)):
        size = _disk_bytes(os.path.join(workdir, "checkpoints", str(step)))
        rows.append((f"{name} (lm quantize)", size, evaluate_workdir(workdir)["loss"]))
    rows.append(("qwix int8 training (fp32 params)", fp32_bytes, evaluate_workdir(qat)["loss"]))
    return [
        {
            "variant": name,
            "params bytes on disk": size,
            "smaller than fp32": f"{fp32_bytes / size:.2f}x",
            "validation loss": round(loss, 4),
            "vs fp32": f"{(loss - base) / base:+.3%}",
            "steps": steps,
        }
        for name, size, loss in rows
    ]
