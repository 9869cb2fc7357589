"""Trainer-side access to packed data: where packs live, `ensure_packed`, batches and evals.

Why: the trainer process must never import TensorFlow or seqio (they slowed its XLA step and
held whole splits in memory). `lm data pack` (lm/data/pack.py, its own process) runs the seqio
Tasks, trains the tokenizer if needed, and writes per component and split an ArrayRecord file of
rows plus meta.json (written last), and a plan.json naming the components and their rates.
Everything here only reads those files, through lm/storage.py (a gs:// pack is copied locally
once, since ArrayRecord readers open local files).

Layout: <cache_root>/<plan key>/plan.json, .../<component>-<split>/{rows.array_record,meta.json}
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import time

import ml_collections
import numpy as np

from lm import jsonio, stages, storage
from lm.data import curriculum as curriculum_lib
from lm.data.grain_pipeline import GlobalSampler, GrainBatchIterator, batch_features, decode_row
from lm.errors import DataError
from lm.stages import LIVE, stage

PACK_VERSION = 3
SPLITS = ("train", "validation")
ERROR_PREFIX = "lm data error: "
# The packing process announces its phases on stderr when this is "1" (lm/data/pack.py).
PHASES_ENV = "LM_PACK_PHASES"
PHASE_PREFIX = "lm-phase: "
# A log line of the packing process (lm.cli.quiet_logs' format), relayed to this one's stderr.
_LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) ")


def cache_root(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    return cfg.data.cache_dir or storage.join(workdir, "data_cache")


def tokenizer_file(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """The configured tokenizer, else the one `lm data pack` trains into the workdir."""
    return cfg.tokenizer.path or storage.join(workdir, "tokenizer", "spm.model")


def plan_key(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    """A hash of everything that defines the packed rows (TF-free: the config and file stamps,
    per component for a mixture, so editing any component's files repacks)."""
    from lm.data.documents import configured_components
    from lm.data.sources import content_stamp

    data = cfg.data.to_dict()
    data.pop("batch_size", None)
    for key in ("cache_dir", "read_threads", "prefetch_batches"):  # not in the rows
        data.pop(key, None)
    if cfg.data.source == "task":
        stamp = ""
    elif cfg.data.source == "mixture":
        stamp = {c.name: content_stamp(c.data) for c in configured_components(cfg.data)}
    else:
        stamp = content_stamp(cfg.data)
    key = dict(
        version=PACK_VERSION,
        data=data,
        stamp=stamp,
        tokenizer={k: v for k, v in cfg.tokenizer.to_dict().items() if k != "path"},
        tokenizer_file=storage.absolute(tokenizer_file(cfg, workdir)),
    )
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def plan_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    return storage.join(cache_root(cfg, workdir), plan_key(cfg, workdir))


def is_packed(cfg: ml_collections.ConfigDict, workdir: str) -> bool:
    return storage.exists(storage.join(plan_dir(cfg, workdir), "plan.json")) and storage.exists(
        tokenizer_file(cfg, workdir)
    )


def ensure_packed(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Runs `lm data pack` in a subprocess when any pack (or the tokenizer) is missing; a
    user error there is raised here as a one-line DataError.

    The child's phases (loading TensorFlow, training the tokenizer, packing each split) become
    stages of this process, shown live on a terminal and named with their times in the
    report; its log lines (what it trained, packed or skipped) are relayed to stderr."""
    if is_packed(cfg, workdir):
        return
    overrides = json.dumps({"data": cfg.data.to_dict(), "tokenizer": cfg.tokenizer.to_dict()})
    cmd = [sys.executable, "-m", "lm.cli", "data", "pack", f"--workdir={workdir}"]
    env = {**os.environ, PHASES_ENV: "1"}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    returncode, output = _run_packer([*cmd, f"--config-json={overrides}"], env)
    for line in output:
        if line.startswith(ERROR_PREFIX):
            raise DataError(line[len(ERROR_PREFIX) :])
    if returncode or not is_packed(cfg, workdir):
        tail = "\n".join(output)[-3000:]
        raise RuntimeError(f"lm data pack failed (exit status {returncode}):\n{tail}")


class _Phases:
    """The stage of this process standing for the packing process's current phase."""

    def __init__(self) -> None:
        self._open = None

    def begin(self, name: str) -> None:
        self.end()
        self._open = stage(name)
        self._open.__enter__()

    def end(self) -> None:
        if self._open is not None:
            opened, self._open = self._open, None
            opened.__exit__(None, None, None)


def _run_packer(cmd: list[str], env: dict) -> tuple[int, list[str]]:
    """Runs the packing process; returns (exit status, its output lines but the phase lines).

    Until its first phase, the time is "starting the data process" (the interpreter and
    imports of a fresh process); after its last, "closing the data process" (writing the plan,
    TensorFlow's shutdown)."""
    phases, output = _Phases(), []
    phases.begin("starting the data process")
    last_end = None
    child = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1
    )
    try:
        for raw in child.stdout:
            line = raw.rstrip("\n")
            if line.startswith(PHASE_PREFIX):
                kind, _, name = line[len(PHASE_PREFIX) :].partition(" ")
                if kind == "begin":
                    phases.begin(name)
                else:
                    phases.end()
                    last_end = time.monotonic()
                continue
            output.append(line)
            if _LOG_LINE.match(line):
                LIVE.end()
                sys.stderr.write(line + "\n")
                sys.stderr.flush()
        returncode = child.wait()
        if last_end is not None:
            stages.record("closing the data process", time.monotonic() - last_end)
        return returncode, output
    except BaseException:
        child.kill()
        child.wait()
        raise
    finally:
        phases.end()


def read_plan(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    path = storage.join(plan_dir(cfg, workdir), "plan.json")
    if not storage.exists(path):
        raise DataError(f"no packed data at {path}: run `lm data pack` (lm train does)")
    return _read_pack_json(path)


def _read_pack_json(path: str) -> dict:
    """A plan.json or meta.json of a pack; a damaged one is a one-line DataError."""
    try:
        return jsonio.loads(storage.read_bytes(path))
    except jsonio.JSONError as e:
        raise DataError(f"{path}: {e}; delete that pack's directory to pack it again") from None


class PackedSplit:
    """One component's packed split: `meta` and rows by index (grain ArrayRecordDataSource)."""

    def __init__(self, directory: str, features: tuple[str, ...]):
        import grain

        local = storage.local_copy(directory)
        self.meta = _read_pack_json(storage.join(local, "meta.json"))
        self.features = features
        self.source = (
            grain.sources.ArrayRecordDataSource([storage.join(local, "rows.array_record")])
            if self.meta["rows"]
            else []
        )

    def __len__(self) -> int:
        return int(self.meta["rows"])

    def row(self, i: int) -> dict[str, np.ndarray]:
        return decode_row(self.source[int(i)], self.features)


def _splits(cfg, workdir: str, split: str, only: str | None = None):
    plan = read_plan(cfg, workdir)
    comps = plan["components"]
    if only is not None:
        names = [c["name"] for c in comps]
        if only not in names:
            raise DataError(f"no mixture component {only!r}; there are {names}")
        comps = [c for c in comps if c["name"] == only]
    features = batch_features(cfg.data.objective)
    out = []
    for c in comps:
        s = PackedSplit(storage.join(plan_dir(cfg, workdir), c["dirs"][split]), features)
        if not len(s):
            raise DataError(
                f"data.source={cfg.data.source!r} gave zero {split} rows for component "
                f"{c['name']!r} (path={cfg.data.path!r}; too few documents?)"
            )
        out.append((c, s))
    return out


def _rates(comps: list[dict], progress: float) -> np.ndarray:
    r = np.array([c["rate"] + progress * (c["final_rate"] - c["rate"]) for c in comps])
    return r / r.sum()


def _per_host_batch(cfg: ml_collections.ConfigDict, process_count: int) -> int:
    if cfg.data.batch_size % process_count:
        raise DataError(
            f"--config.data.batch_size={cfg.data.batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    return cfg.data.batch_size // process_count


def read_threads(configured: int) -> int:
    """grain reader threads: `configured`, or for -1 as many as the host can spare."""
    if configured >= 0:
        return int(configured)
    cores = os.cpu_count() or 1
    return 0 if cores <= 4 else min(8, cores // 4)


def make_train_iterator(
    cfg: ml_collections.ConfigDict,
    vocab,
    workdir: str,
    process_index: int = 0,
    process_count: int = 1,
) -> GrainBatchIterator:
    """This host's batches [batch_size // process_count, seq_len]: its share of the global
    batch of every step, which is the same for every process count."""
    _per_host_batch(cfg, process_count)
    del vocab  # the packs were built with it
    schedule = curriculum_lib.Curriculum.from_config(cfg)
    parts = _splits(cfg, workdir, "train")
    comps = [c for c, _ in parts]
    sampler = GlobalSampler(
        [len(s) for _, s in parts],
        lambda step: _rates(comps, schedule.mixture_progress(step)),
        cfg.data.batch_size,
        int(cfg.data.shuffle_seed),
        schedule,
    )
    return GrainBatchIterator(
        [s.source for _, s in parts],
        sampler,
        batch_features(cfg.data.objective),
        process_index,
        process_count,
        tuple(c["name"] for c in comps),
        plan_key(cfg, workdir),
        read_threads(cfg.data.read_threads),
        int(cfg.data.prefetch_batches),
    )


def make_eval_batches(
    cfg: ml_collections.ConfigDict,
    vocab,
    workdir: str,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    component: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """`num_batches` validation batches: host h gets rows [h*B/P, (h+1)*B/P) of each global
    eval batch, which is the same whatever P. Rows are read in order and wrap around; a
    mixture gives each component its final-rate share of the rows (all of them to
    `component`)."""
    per_host = _per_host_batch(cfg, process_count)
    B = cfg.data.batch_size
    parts = _splits(cfg, workdir, "validation", component)
    total = num_batches * B
    exact = _rates([c for c, _ in parts], 1.0) * total
    shares = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - shares))[: total - shares.sum()]:
        shares[i] += 1
    order = [(k, j) for k, n in enumerate(shares) for j in range(int(n))]
    batches = []
    for b in range(num_batches):
        mine = order[b * B + process_index * per_host : b * B + (process_index + 1) * per_host]
        rows = [parts[k][1].row(j % len(parts[k][1])) for k, j in mine]
        batches.append({f: np.stack([r[f] for r in rows]) for f in parts[0][1].features})
    return batches


def validation_bytes_per_token(cfg: ml_collections.ConfigDict, vocab, workdir: str) -> float:
    """UTF-8 bytes per target token (EOS included) over the validation split, from the packs'
    meta.json (a mixture weights its components by their final rates).

    bits per byte = mean loss per token (nats) / ln 2 / this.
    """
    del vocab
    parts = _splits(cfg, workdir, "validation")
    rates = _rates([c for c, _ in parts], 1.0)
    n_bytes = sum(r * s.meta["bytes"] for r, (_, s) in zip(rates, parts))
    n_tokens = sum(r * s.meta["tokens"] for r, (_, s) in zip(rates, parts))
    return n_bytes / n_tokens
