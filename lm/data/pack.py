"""`lm data pack`: tokenizer training, seqio Task preprocessing and packing, in its own process.

Why apart: TensorFlow/seqio slowed the XLA train step of the process that ran them (see
BENCHMARKS.md) and a split built in memory made trainer RSS grow with the corpus. This process
trains the tokenizer when none is configured, resolves the mixture components (registering
data_mixtures/ Tasks, so source=task works), and writes for each component and split the
WHOLE split's packed rows (lm/data/pipeline.py `build_rows`) as one ArrayRecord file plus
meta.json written last, then plan.json (lm/data/packed.py reads them with grain).

Each slow phase (loading TensorFlow, training the tokenizer, packing a split) is a named stage:
run by `lm train` (`ensure_packed`), it prints `lm-phase: begin NAME` / `lm-phase: end NAME`
lines that the trainer turns into its own live stages and report rows; run by hand, it shows
the live stage lines itself. A user error, even one raised inside a tf.data pipeline, ends the
process with one `lm data error: ...` line and status 2.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import ml_collections

from lm import storage
from lm.data import packed
from lm.data.grain_pipeline import batch_features, encode_row
from lm.errors import ConfigError, DataError, LMError
from lm.stages import stage

# A user error TensorFlow wrapped (raised in a tf.data generator): its class and message.
_WRAPPED_ERROR = re.compile(
    r"\b(?:lm\.errors\.)?(?:DataError|ConfigError|CheckpointError|LMError|FileNotFoundError): "
    r"(.+)"
)


@contextmanager
def _phase(name: str) -> Iterator[None]:
    """A named stage of packing: phase lines for the parent (`ensure_packed` sets
    packed.PHASES_ENV), else this process's own live stage line."""
    if os.environ.get(packed.PHASES_ENV) != "1":
        with stage(name):
            yield
        return
    print(f"{packed.PHASE_PREFIX}begin {name}", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        print(f"{packed.PHASE_PREFIX}end {name}", file=sys.stderr, flush=True)


def _train_tokenizer_if_missing(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    from lm.tokenizer.sentencepiece_tokenizer import train_tokenizer

    path = packed.tokenizer_file(cfg, workdir)
    if not storage.exists(path):
        logging.info(
            "training a %s tokenizer (vocab %d)", cfg.tokenizer.kind, cfg.tokenizer.vocab_size
        )
        with _phase("training the tokenizer"):
            path = train_tokenizer(cfg.data, cfg.tokenizer, os.path.dirname(path))
    return path


def _write_split(ccfg, vocab, split: str, out_dir: str) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    from lm.data.pipeline import build_rows

    rows, meta = build_rows(ccfg, vocab, split, 0, 1)
    if meta["rows"] == 0:
        raise DataError(
            f"data.source={ccfg.data.source!r} gave zero {split} rows "
            f"(path={ccfg.data.path!r}; too few documents, or validation_fraction too small?)"
        )
    features = batch_features(ccfg.data.objective)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "rows.array_record")
        writer = ArrayRecordWriter(local, "group_size:1")
        for i in range(meta["rows"]):
            writer.write(encode_row({k: rows[k][i] for k in features}, features))
        writer.close()
        with open(local, "rb") as f:
            storage.write_bytes(storage.join(out_dir, "rows.array_record"), f.read())
    storage.write_text(storage.join(out_dir, "meta.json"), json.dumps(meta))  # last
    return meta


def pack(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """Builds every pack `lm train` reads for `cfg`; returns the plan directory."""
    from lm.data.tf_quiet import tf_cpu_only

    tf_cpu_only()  # before seqio imports TensorFlow: quiet, GPUs hidden
    from lm.data import mixture, pipeline
    from lm.tokenizer.sentencepiece_tokenizer import load_vocabulary

    vocab_path = _train_tokenizer_if_missing(cfg, workdir)
    vocab = load_vocabulary(vocab_path, cfg.tokenizer.extra_ids)
    root = packed.plan_dir(cfg, workdir)
    comps = []
    components = mixture.components_for_training(cfg.data, vocab_path)
    for i, c in enumerate(components):
        ccfg = pipeline.component_cfg(cfg, c)
        dirs = {}
        for split in packed.SPLITS:
            dirs[split] = f"{i:02d}-{split}"
            out = storage.join(root, dirs[split])
            if not storage.exists(storage.join(out, "meta.json")):
                what = f"{c.name} {split}" if len(components) > 1 else split
                with _phase(f"packing the {what} split"):
                    meta = _write_split(ccfg, vocab, split, out)
                logging.info(
                    "data: packed %s %s rows of %s -> %s", meta["rows"], c.name, split, out
                )
        comps.append(dict(name=c.name, rate=c.rate, final_rate=c.final_rate, dirs=dirs))
    storage.write_text(storage.join(root, "plan.json"), json.dumps({"components": comps}))
    return root


def main(argv: list[str]) -> int:
    """`lm data pack --experiment=NAME --workdir=W [--config.x=y ...]` (or `--config-json=` of
    the data and tokenizer groups, as `ensure_packed` passes); exit 2 on a data error."""
    from lm.config import apply_overrides, check_values, default_config, load_experiment

    opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    overrides = [a for a in argv if a.startswith("--config.")]
    try:
        if "workdir" not in opts:
            raise ConfigError("lm data pack needs --workdir=DIR")
        exp = opts.get("experiment")
        cfg = load_experiment(exp) if exp else default_config()
        if "config-json" in opts:
            groups = json.loads(opts["config-json"])
            cfg.data = ml_collections.ConfigDict(groups["data"])
            cfg.tokenizer = ml_collections.ConfigDict(groups["tokenizer"])
        cfg = apply_overrides(cfg, overrides)
        check_values(cfg)
        with _phase("loading TensorFlow and seqio"):
            from lm.data.tf_quiet import tf_cpu_only

            tf_cpu_only()
            from data_mixtures import load_registrations

            load_registrations()
        root = pack(cfg, opts["workdir"])
    except (LMError, FileNotFoundError) as e:
        return _user_error(_first_line(str(e)) or repr(e))
    except Exception as e:
        wrapped = _WRAPPED_ERROR.search(str(e))
        if wrapped is None:
            raise  # a bug, not a user error: the traceback says where
        return _user_error(wrapped.group(1).strip())
    print(f"packed -> {root}")
    return 0


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0]


def _user_error(message: str) -> int:
    """Prints the one line `ensure_packed` turns into a DataError; exit status 2."""
    print(f"{packed.ERROR_PREFIX}{message}", file=sys.stderr, flush=True)
    return 2
