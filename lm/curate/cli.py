"""`lm data run --pipeline=NAME --output=DIR [--config.a.b=value ...] [beam flags ...]`.

Flags this module does not know are handed to Beam untouched, so the same command runs locally
(`--runner=DirectRunner`, optionally `--direct_running_mode=multi_processing
--direct_num_workers=2`) or on Dataflow/Flink/Spark by flags. The runner is always named: when no
`--runner` is given we pass the in-memory DirectRunner explicitly rather than rely on Beam's
default. User mistakes (unknown pipeline, bad override, missing input) print one line and return
exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any

import ml_collections

from lm.config import apply_overrides
from lm.curate import output
from lm.curate.config import config_hash, list_pipelines, load_pipeline, validate
from lm.curate.sources import expand_inputs
from lm.errors import ConfigError


def _runner_args(beam_args: list[str]) -> list[str]:
    """Beam flags with the runner named explicitly (in-memory DirectRunner by default)."""
    args: list[str] = []
    i = 0
    while i < len(beam_args):  # `--runner X` -> `--runner=X`, so it is found below
        if beam_args[i] == "--runner" and i + 1 < len(beam_args):
            args.append(f"--runner={beam_args[i + 1]}")
            i += 2
        else:
            args.append(beam_args[i])
            i += 1
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DirectRunner")
    runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "")
    if runner == "DirectRunner" and not any(a.startswith("--direct_running_mode") for a in args):
        args.append("--direct_running_mode=in_memory")
    return args


def run_curation(
    cfg: ml_collections.ConfigDict, output_dir: str, beam_args: list[str], name: str = ""
) -> dict[str, Any]:
    """Runs a configured pipeline into `output_dir`; returns the report dict.

    Raises ConfigError for user mistakes (no inputs, bad source type)."""
    plain = cfg.to_dict()
    validate(plain)
    inputs = expand_inputs(plain["source"])
    if not inputs:
        raise ConfigError(f"no input files matched source {plain['source']['type']!r}")
    output_dir = output_dir.rstrip("/")
    # Beam is imported only now: user mistakes above fail fast, without its import-time noise.
    from lm.curate import pipeline, report

    output.clear_previous(output_dir)
    args = _runner_args(beam_args)
    result = pipeline.run(plain, inputs, output_dir, args)
    stats, clusters, shards = result["stats"], result["clusters"], result["shards"]
    chash = config_hash(cfg)
    runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), "")
    meta = {
        "pipeline": name,
        "description": plain.get("description", ""),
        "config_hash": chash,
        "runner": runner,
        "seconds": result["seconds"],
    }
    rep = report.write_report(output_dir, stats, clusters, meta)
    manifest = {
        "pipeline": name,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "config_hash": chash,
        "config": json.loads(json.dumps(plain, default=str)),
        "sources": {
            "type": plain["source"]["type"],
            "path": plain["source"]["path"],
            "inputs": len(inputs),
        },
        "counts": {
            "inputs": stats["inputs"][0],
            "kept": stats["kept"][0],
            "rejected": stats["inputs"][0] - stats["kept"][0],
            "by_reason": {k: v[0] for k, v in sorted(stats["reasons"].items())},
            "bytes_in": stats["inputs"][1],
            "bytes_kept": stats["kept"][1],
        },
        "reconciled": rep["reconciled"],
        "format": "array_record",
        "record": "JSON: " + ", ".join(output.KEPT_FIELDS),
        "decontam_ngrams": result["decontam_ngrams"],
        "shards": shards,
    }
    output.write_text(f"{output_dir}/manifest.json", json.dumps(manifest, indent=1))
    output.remove(f"{output_dir}/_stats.json")
    return rep


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lm data",
        description="Curate pretraining data with an Apache Beam pipeline.",
        epilog="Other flags (--runner, --direct_num_workers, --project ...) go to Beam.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a named pipeline from pipelines/")
    run.add_argument("--pipeline", default="stdlib", help="a module in pipelines/ (stdlib, web)")
    run.add_argument("--output", required=True, help="output directory")
    sub.add_parser("list", help="list the named pipelines")
    sub.add_parser("pack", help="tokenize and pack training data (--experiment, --workdir)")
    return p


def main(argv: list[str]) -> int:
    """Entry point of `lm data ...`; returns the exit status."""
    try:
        args, rest = _parser().parse_known_args(argv)
    except SystemExit as e:  # argparse already printed a one-line usage error
        return int(e.code or 0)
    if args.command == "pack":  # packing for training (lm/data/pack.py), not curation
        from lm.data.pack import main as pack_main

        return pack_main(rest)
    if args.command == "list":
        for name, doc in list_pipelines().items():
            print(f"{name:12s} {doc}")
        return 0
    overrides = [a for a in rest if a.startswith("--config.")]
    beam_args = [a for a in rest if not a.startswith("--config.")]
    try:
        cfg = apply_overrides(load_pipeline(args.pipeline), overrides)
        rep = run_curation(cfg, args.output, beam_args, name=args.pipeline)
    except ConfigError as e:
        print(f"lm data: error: {e}", file=sys.stderr)
        return 2
    n_in, n_kept = rep["inputs"][0], rep["kept"][0]
    print(
        f"{args.pipeline}: {n_in:,} documents in, {n_kept:,} kept, {n_in - n_kept:,} removed "
        f"in {rep['seconds']:.1f}s (reconciled: {rep['reconciled']}) -> {args.output}"
    )
    print(f"report: {args.output.rstrip('/')}/data_report.md")
    return 0 if rep["reconciled"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
