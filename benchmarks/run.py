"""`make bench`: training tokens/s on this machine (and data-stage docs/s), into BENCHMARKS.md.

Training throughput is measured through the real `lm train` loop (data iterator, sharded jit
step, metrics): the median of the logged tokens/s windows after the first (compile) window.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import tempfile

CASES = {
    # nanoGPT's shakespeare_char CPU quick-start shape: batch 12 x 64, 4 layers, 4 heads, 128 wide.
    "char_tiny": [
        "--config.data.batch_size=12",
        "--config.data.seq_len=64",
        "--config.model.num_layers=4",
        "--config.model.num_heads=4",
        "--config.model.d_model=128",
        "--config.model.dtype=float32",
    ],
    "tiny": ["--config.model.dtype=float32"],
}


def corpus_file(directory: str, max_bytes: int = 1_000_000) -> str:
    """~1 MB of standard-library source as one text file, for the character-level case."""
    root, out, size = sysconfig.get_paths()["stdlib"], [], 0
    for name in sorted(os.listdir(root)):
        if name.endswith(".py") and size < max_bytes:
            with open(os.path.join(root, name), encoding="utf-8", errors="replace") as f:
                text = f.read()
            out.append(text)
            size += len(text.encode())
    path = os.path.join(directory, "corpus.txt")
    with open(path, "w") as f:
        f.write("\n\n".join(out))
    return path


def train_throughput(experiment: str, overrides: list[str], steps: int, workdir: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "lm.cli",
        "train",
        f"--experiment={experiment}",
        f"--workdir={workdir}",
        f"--config.train.steps={steps}",
        "--config.train.log_every=50",
        f"--config.train.eval_every={steps}",
        f"--config.train.checkpoint_every={steps}",
        "--config.train.sample_prompts=",
        *overrides,
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    windows = [r["tokens_per_s"] for r in records if r["split"] == "train"][1:]
    return {
        "median_tokens_per_s": statistics.median(windows),
        "windows": len(windows),
        "steps": steps,
    }


SECTIONS = {
    "moe": ("Mixture of experts: moe_tiny dropless vs capacity vs dense", "bench_moe", "moe_rows"),
    "quant": (
        "Weight-only quantization: size on disk and validation loss",
        "bench_quant",
        "quant_rows",
    ),
    "serve": (
        "Serving: decode vs Hugging Face generate, continuous batching",
        "bench_serve",
        "serve_rows",
    ),
    "finetune": (
        "Fine-tuning throughput: pretraining vs SFT full, LoRA and GRPO on the same shape",
        "bench_finetune",
        "finetune_rows",
    ),
}


def run_section(name: str) -> tuple[str, list[dict]]:
    """(title, rows) of one extra section, each row a dict of column -> value."""
    import importlib

    if name not in SECTIONS:
        raise SystemExit(f"--sections: unknown {name!r}; known: {', '.join(SECTIONS)}")
    title, module, function = SECTIONS[name]
    with tempfile.TemporaryDirectory() as tmp:
        rows = getattr(importlib.import_module(f"benchmarks.{module}"), function)(tmp)
    for row in rows:
        print(f"{name}: {json.dumps(row)}", flush=True)
    return title, rows


def markdown_table(rows: list[dict]) -> list[str]:
    """Rows of dicts (same keys) as markdown table lines; floats with 4 significant digits."""
    if not rows:
        return ["(no rows)"]
    keys = list(rows[0])

    def cell(v):
        return f"{v:,.4g}" if isinstance(v, float) else str(v)

    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="BENCHMARKS.md")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--skip_data", action="store_true")
    parser.add_argument(
        "--sections",
        default="moe,quant,serve,finetune",
        help="comma-separated extra sections: moe (dropless vs capacity vs dense), quant (int8)",
    )
    parser.add_argument("--only", default="", help="comma-separated training cases, e.g. char_tiny")
    args = parser.parse_args()
    only = set(filter(None, args.only.split(",")))
    if only - set(CASES):
        parser.error(f"--only: unknown case(s) {sorted(only - set(CASES))}; known: {list(CASES)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        text = corpus_file(tmp)
        for name, overrides in CASES.items():
            if only and name not in only:
                continue
            extra = [f"--config.data.path={text}"] if name == "char_tiny" else []
            result = train_throughput(name, overrides + extra, args.steps, os.path.join(tmp, name))
            print(f"{name}: {result['median_tokens_per_s']:,.0f} tokens/s", flush=True)
            rows.append((name, " ".join(overrides), result))
    data_result = None
    if not args.skip_data:
        from benchmarks import bench_data

        data_result = bench_data.run()
        print(f"data: {json.dumps(data_result)}")
    extra_sections = []
    for section in filter(None, args.sections.split(",")):
        extra_sections.append(run_section(section))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.processor() or 'cpu'}"
    lines = [
        "# Benchmarks",
        "",
        f"`make bench` on {datetime.date.today()}, {machine}, Python {platform.python_version()}.",
        "",
        "## Training throughput (median tokens/s through `lm train`, fp32, CPU)",
        "",
        "| experiment | overrides | tokens/s | steps |",
        "|---|---|---|---|",
    ]
    for name, overrides, r in rows:
        lines.append(f"| {name} | `{overrides}` | {r['median_tokens_per_s']:,.0f} | {r['steps']} |")
    if data_result:
        lines += ["", "## Data stage", "", "```json", json.dumps(data_result, indent=2), "```"]
    for title, section_rows in extra_sections:
        lines += ["", f"## {title}", "", *markdown_table(section_rows)]
    with open(args.out + ".latest", "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}.latest (copy the numbers you keep into {args.out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
