"""`lm data run --pipeline=NAME --output=DIR [--config.a.b=value ...] [--verbose] [beam flags]`.

Flags this module does not know are handed to Beam untouched, so the same command runs on any
runner; the runner is always named (no `--runner`: the in-memory DirectRunner, passed
explicitly rather than left to Beam's default). The runners, exactly:

  # one process, or several local worker processes
  lm data run --pipeline=stdlib --output=/tmp/cur --runner=DirectRunner
  lm data run --pipeline=stdlib --output=/tmp/cur --runner=DirectRunner \
      --direct_running_mode=multi_processing --direct_num_workers=8

  # a dask.distributed cluster (pip install 'apache-beam[dask]==2.77.0'; start it with
  # `dask scheduler` and one `dask worker tcp://HOST:8786` per machine, each worker with `lm`
  # installed and the inputs and --output reachable at the same paths, e.g. gs://)
  lm data run --pipeline=web --output=gs://BUCKET/cur --config.source.path=gs://BUCKET/wet \
      --runner=DaskRunner --dask_client_address=HOST:8786

  # Google Cloud Dataflow (workers install this package from the sdist that --setup_file builds)
  lm data run --pipeline=web --output=gs://BUCKET/cur --config.source.path=gs://BUCKET/wet \
      --runner=DataflowRunner --project=PROJECT --region=us-central1 \
      --temp_location=gs://BUCKET/tmp --setup_file=./setup.py

  # Flink or Spark, through Beam's portable job server (Java on the submitting machine)
  lm data run --pipeline=web --output=gs://BUCKET/cur --runner=FlinkRunner \
      --flink_master=HOST:8081 --environment_type=LOOPBACK
  lm data run --pipeline=web --output=gs://BUCKET/cur --runner=SparkRunner \
      --spark_master_url=spark://HOST:7077 --environment_type=LOOPBACK

Quiet by default: one progress line per stage (inputs found, pipeline finished) and the summary;
Beam's and dask's INFO lines only with `--verbose`. User mistakes (unknown pipeline, bad override,
missing input, a Dataflow run without its project, region or gs:// temp location) print one line
and return exit status 2, never a stack trace.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from typing import Any

import ml_collections

from lm.config import apply_overrides
from lm.curate import output, publish
from lm.curate.config import config_hash, list_pipelines, load_pipeline, validate
from lm.curate.inputs import expand_inputs
from lm.errors import ConfigError, DataError

_DATAFLOW_NEEDS = ("--project", "--region", "--temp_location")


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` in `args` (None when absent)."""
    return next((a.split("=", 1)[1] for a in args if a.startswith(name + "=")), None)


def _runner_args(beam_args: list[str]) -> list[str]:
    """Beam flags with the runner named explicitly (in-memory DirectRunner by default).

    `--flag value` becomes `--flag=value`, so flags are found by name below. Raises ConfigError
    for a runner that could only fail later, with a traceback: Dataflow without its project,
    region or gs:// temp location, Dask without dask installed."""
    args: list[str] = []
    i = 0
    while i < len(beam_args):
        a = beam_args[i]
        takes_value = a.startswith("--") and "=" not in a and i + 1 < len(beam_args)
        if takes_value and not beam_args[i + 1].startswith("--"):
            args.append(f"{a}={beam_args[i + 1]}")
            i += 2
        else:
            args.append(a)
            i += 1
    if _flag(args, "--runner") is None:
        args.append("--runner=DirectRunner")
    runner = _flag(args, "--runner") or ""
    short = runner.rsplit(".", 1)[-1]
    if short == "DirectRunner":
        if _flag(args, "--direct_running_mode") is None:
            args.append("--direct_running_mode=in_memory")
    elif short == "DataflowRunner":
        missing = [f for f in _DATAFLOW_NEEDS if not _flag(args, f)]
        if missing:
            raise ConfigError(f"--runner=DataflowRunner needs {', '.join(missing)}")
        if not (_flag(args, "--temp_location") or "").startswith("gs://"):
            raise ConfigError("--runner=DataflowRunner needs a gs:// --temp_location")
    elif short == "DaskRunner":
        try:
            import dask.distributed  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--runner=DaskRunner needs dask: pip install 'apache-beam[dask]==2.77.0'"
            ) from None
    return args


def _quiet(verbose: bool) -> None:
    """Without --verbose, Beam's and dask's INFO lines are dropped: their loggers (and those of
    the worker processes they start) log warnings and errors only. With it, every log line says
    which library wrote it."""
    import logging

    noisy = ("apache_beam", "distributed", "dask", "absl", "tensorflow", "tensorflow_datasets")
    if verbose:
        logging.basicConfig(
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
            force=True,
        )
        for name in noisy:
            logging.getLogger(name).setLevel(logging.INFO)
        return
    # Read by dask when it is imported (the scheduler and worker processes it starts inherit it).
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    for name in noisy:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Some Beam modules log on the root logger at import ("apitools not found ..."): drop those
    # below ERROR too, by where they come from.
    root = logging.getLogger()
    if not any(isinstance(f, _FromBeam) for f in root.filters):
        root.addFilter(_FromBeam())


class _FromBeam:
    """A logging filter: False (drop) for records below ERROR logged from Beam's source files."""

    def filter(self, record) -> bool:
        return record.levelno >= 40 or f"{os.sep}apache_beam{os.sep}" not in record.pathname


def _worker_log_args(args: list[str], verbose: bool) -> list[str]:
    """The DirectRunner's multi-processing workers are separate processes that configure their
    own logging from this Beam flag: quiet them too, unless asked for."""
    if verbose or _flag(args, "--default_sdk_harness_log_level") is not None:
        return args
    if (_flag(args, "--runner") or "").rsplit(".", 1)[-1] != "DirectRunner":
        return args
    return args + ["--default_sdk_harness_log_level=WARNING"]


def run_curation(
    cfg: ml_collections.ConfigDict, output_dir: str, beam_args: list[str], name: str = ""
) -> dict[str, Any]:
    """Runs a configured pipeline into `output_dir`; returns the report dict.

    The run is written into a staging directory beside `output_dir` and replaces the previous
    output only once it is complete and reconciled (publish.py): a run that fails, for any
    reason, leaves the previous output as it was and no manifest anything would read. Raises
    ConfigError for user mistakes (no inputs, bad source type), and DataError (one line: how
    many documents, the first ids, where the failed run's report is) when what was written does
    not reconcile with what was read."""
    plain = cfg.to_dict()
    validate(plain)
    inputs = expand_inputs(plain["source"])
    if not inputs:
        raise ConfigError(f"no input files matched source {plain['source']['type']!r}")
    output_dir = publish.resolve(output_dir)
    args = _runner_args(beam_args)
    staging = publish.staging_dir(output_dir)
    try:
        rep, rec = _curate(cfg, plain, inputs, staging, args, name)
    except BaseException:
        publish.discard(staging)
        raise
    if not rec["ok"]:
        from lm.curate import report

        failed = publish.keep_failed_report(staging, output_dir)
        raise DataError(report.mismatch_message(rec, failed))
    publish.publish(staging, output_dir)
    return rep


def _curate(cfg, plain: dict, inputs: list, output_dir: str, args: list[str], name: str):
    """Runs the pipeline into `output_dir` (the staging directory) and writes its report, and,
    last and only if the run reconciled, its manifest. Returns (report, reconciliation)."""
    # Beam is imported only now: user mistakes above fail fast, without its import-time noise.
    from lm.curate import pipeline, report

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
    # Checked against the readers' own counts and an id-by-id join of read and written, not
    # only the chain's summaries; a mismatch is written down, then fails the run.
    rec = report.reconcile(stats, result["read"], result["ids"])
    rep = report.write_report(output_dir, stats, clusters, meta, rec)
    output.remove(f"{output_dir}/_stats.json")
    if not rec["ok"]:
        return rep, rec
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
            "inputs": rec["read"]["records"],
            "kept": rec["ids"]["kept"],
            "rejected": rec["ids"]["rejected"],
            "by_reason": {k: v[0] for k, v in sorted(stats["reasons"].items())},
            "bytes_in": stats["inputs"][1],
            "bytes_kept": stats["kept"][1],
            "duplicate_ids_renamed": rec["read"]["duplicate_ids"],
        },
        "reconciled": rep["reconciled"],
        "format": "array_record",
        "record": "JSON: " + ", ".join(output.KEPT_FIELDS),
        "decontam_ngrams": result["decontam_ngrams"],
        "shards": shards,
    }
    output.write_text(f"{output_dir}/{output.MANIFEST}", json.dumps(manifest, indent=1))
    return rep, rec


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
    run.add_argument(
        "--verbose", action="store_true", help="also show Beam's and dask's INFO log lines"
    )
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
    _quiet(args.verbose)
    try:
        cfg = apply_overrides(load_pipeline(args.pipeline), overrides)
        beam_args = _worker_log_args(_runner_args(beam_args), args.verbose)
        rep = run_curation(cfg, args.output, beam_args, name=args.pipeline)
    except (ConfigError, DataError) as e:
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
