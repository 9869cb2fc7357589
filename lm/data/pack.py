"""`lm data pack`: tokenizer training, seqio Task preprocessing and packing, in its own process.

Why apart: TensorFlow/seqio slowed the XLA train step of the process that ran them (see
BENCHMARKS.md) and a split built in memory made trainer RSS grow with the corpus. This process
trains the tokenizer when none is configured, resolves the mixture components (registering
data_mixtures/ Tasks, so source=task works), and writes for each component and split the
WHOLE split's packed rows (lm/data/pipeline.py `build_rows`) as one ArrayRecord file plus
meta.json written last, then plan.json (lm/data/packed.py reads them with grain).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile

import ml_collections

from lm import storage
from lm.data import packed
from lm.data.grain_pipeline import batch_features, encode_row
from lm.errors import ConfigError, DataError


def _train_tokenizer_if_missing(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    from lm.tokenizer.sentencepiece_tokenizer import train_tokenizer

    path = packed.tokenizer_file(cfg, workdir)
    if not storage.exists(path):
        logging.info(
            "training a %s tokenizer (vocab %d)", cfg.tokenizer.kind, cfg.tokenizer.vocab_size
        )
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
    from lm.data import mixture, pipeline
    from lm.tokenizer.sentencepiece_tokenizer import load_vocabulary

    vocab_path = _train_tokenizer_if_missing(cfg, workdir)
    vocab = load_vocabulary(vocab_path, cfg.tokenizer.extra_ids)
    root = packed.plan_dir(cfg, workdir)
    comps = []
    for i, c in enumerate(mixture.components_for_training(cfg.data, vocab_path)):
        ccfg = pipeline.component_cfg(cfg, c)
        dirs = {}
        for split in packed.SPLITS:
            dirs[split] = f"{i:02d}-{split}"
            out = storage.join(root, dirs[split])
            if not storage.exists(storage.join(out, "meta.json")):
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
    from lm.config import apply_overrides, default_config, load_experiment

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
        from data_mixtures import load_registrations

        load_registrations()
        root = pack(cfg, opts["workdir"])
    except (DataError, ConfigError, FileNotFoundError) as e:
        print(f"{packed.ERROR_PREFIX}{str(e).splitlines()[0] if str(e) else e!r}", file=sys.stderr)
        return 2
    print(f"packed -> {root}")
    return 0
