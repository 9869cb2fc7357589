"""Packed training batches: seqio Task + packing once, cached as .npy, served by a tiny sampler.

The seqio Task (tokenize, EOS, cut documents into <= seq_len pieces) and seqio's packing run
once per (documents, vocabulary, seq_len, split, host shard). The packed rows are cached under
`cfg.data.cache_dir` (default `<workdir>/data_cache`) in a directory named by a hash of all of
those, written atomically and reused by later runs. Serving is then a numpy gather of
`batch` rows per step, so the input pipeline costs microseconds, not a TF graph per batch.

Every batch is a dict of np.ndarray [batch_per_host, seq_len]:
  inputs      int32   BOS (id 3) then the targets shifted right, restarting in every segment
  targets     int32   the next token to predict (0 = padding)
  segment_ids int32   1, 2, ... per packed document piece; 0 = padding
  positions   int32   0, 1, ... restarting in each segment
  weights     float32 1.0 where the target counts in the loss

Order: epoch e is a permutation of the rows drawn from (shuffle_seed, e, host); the stream of
rows is the concatenation of epochs, cut into batches, so the iterator state is one integer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time

import ml_collections
import numpy as np
import seqio

from lm.data.sources import DataError, iter_documents, tf_cpu_only

FEATURES = ("inputs", "targets", "segment_ids", "positions", "weights")
_CACHE_VERSION = 1
BOS_ID = 3
_CONVERTER_KEYS = {
    "inputs": "decoder_input_tokens",
    "targets": "decoder_target_tokens",
    "segment_ids": "decoder_segment_ids",
    "positions": "decoder_positions",
    "weights": "decoder_loss_weights",
}


def _vocab_digest(vocab: seqio.Vocabulary) -> str:
    model = getattr(vocab, "sp_model", None)
    return hashlib.sha256(model if model else str(vocab).encode()).hexdigest()


def _cache_root(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    return cfg.data.cache_dir or os.path.join(workdir, "data_cache")


def _cache_key(
    cfg: ml_collections.ConfigDict, vocab: seqio.Vocabulary, split: str, shard: int, count: int
) -> str:
    from data_mixtures.text import docs_fingerprint

    docs = {"task": cfg.data.task} if cfg.data.source == "task" else docs_fingerprint(cfg.data)
    key = dict(
        version=_CACHE_VERSION,
        docs=docs,
        vocab=_vocab_digest(vocab),
        seq_len=cfg.data.seq_len,
        split=split,
        shard=shard,
        count=count,
    )
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _task_dataset(cfg, vocab, split: str, shard: int, count: int):
    """The seqio Task's dataset of {"targets": [<= seq_len]} pieces for this host's shard."""
    from data_mixtures.text import register_text_task, split_to_pieces

    tf = tf_cpu_only()
    lengths = {"targets": cfg.data.seq_len}
    shard_info = seqio.ShardInfo(index=shard, num_shards=count)
    if cfg.data.source == "task":
        if not cfg.data.task:
            raise DataError("data.source=task needs --config.data.task=NAME (a seqio Task/Mixture)")
        try:
            task = seqio.get_mixture_or_task(cfg.data.task)
        except ValueError:
            raise DataError(
                f"--config.data.task={cfg.data.task!r} is not a registered seqio Task or Mixture"
            ) from None
        if "targets" not in task.output_features:
            raise DataError(f"seqio task {cfg.data.task!r} has no 'targets' output feature")
        if split not in task.splits:
            raise DataError(f"seqio task {cfg.data.task!r} has no {split!r} split ({task.splits})")
        ds = task.get_dataset(lengths, split=split, shuffle=False, shard_info=shard_info)
        ds = ds.map(lambda ex: {"targets": tf.cast(ex["targets"], tf.int32)})
        return split_to_pieces(ds, lengths, None)
    vocab_path = getattr(vocab, "sentencepiece_model_file", None)
    if not vocab_path:
        raise DataError("the data pipeline needs a seqio.SentencePieceVocabulary")
    task = seqio.get_mixture_or_task(register_text_task(cfg.data, vocab_path))
    return task.get_dataset(lengths, split=split, shuffle=False, shard_info=shard_info)


def _source_bytes(cfg, split: str, shard: int, count: int) -> int:
    if cfg.data.source == "task":
        return 0
    return sum(len(d.encode("utf-8")) for d in iter_documents(cfg.data, split, shard, count))


def _build_rows(cfg, vocab, split: str, shard: int, count: int) -> tuple[dict, dict]:
    """Runs the Task and seqio packing; returns ({feature: [rows, seq_len]}, meta)."""
    start = time.time()
    ds = _task_dataset(cfg, vocab, split, shard, count)
    converter = seqio.DecoderFeatureConverter(pack=True, bos_id=BOS_ID)
    ds = converter(ds, {"targets": cfg.data.seq_len}).batch(1024)
    parts = {k: [] for k in FEATURES}
    for batch in ds.as_numpy_iterator():
        for k in FEATURES:
            parts[k].append(batch[_CONVERTER_KEYS[k]])
    L = cfg.data.seq_len
    rows = {
        k: (np.concatenate(v) if v else np.zeros((0, L))).astype(
            np.float32 if k == "weights" else np.int32
        )
        for k, v in parts.items()
    }
    meta = dict(
        rows=int(rows["targets"].shape[0]),
        tokens=int((rows["targets"] != 0).sum()),
        bytes=_source_bytes(cfg, split, shard, count),
        seconds=round(time.time() - start, 3),
    )
    return rows, meta


def load_packed_rows(
    cfg: ml_collections.ConfigDict,
    vocab: seqio.Vocabulary,
    workdir: str,
    split: str,
    shard: int = 0,
    count: int = 1,
) -> tuple[dict[str, np.ndarray], dict]:
    """This host's packed rows of `split` ({feature: [rows, seq_len]}) and their metadata.

    Built on first use and cached; later calls (and later runs) memory-map the cache.
    """
    root = _cache_root(cfg, workdir)
    final = os.path.join(
        root, f"{split}-{shard}of{count}-{_cache_key(cfg, vocab, split, shard, count)}"
    )
    if not os.path.exists(os.path.join(final, "meta.json")):
        rows, meta = _build_rows(cfg, vocab, split, shard, count)
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
        for k, v in rows.items():
            np.save(os.path.join(tmp, f"{k}.npy"), v)
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, final)
        except OSError:  # Another process finished the same cache first: keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
        logging.info(
            "data: built %s rows of %s in %.1fs -> %s", meta["rows"], split, meta["seconds"], final
        )
    with open(os.path.join(final, "meta.json")) as f:
        meta = json.load(f)
    rows = {k: np.load(os.path.join(final, f"{k}.npy"), mmap_mode="r") for k in FEATURES}
    if meta["rows"] == 0:
        raise DataError(
            f"data.source={cfg.data.source!r} gave zero {split} rows for host {shard} of {count} "
            f"(path={cfg.data.path!r}; too few documents, or validation_fraction too small?)"
        )
    return rows, meta


def _per_host_batch(cfg: ml_collections.ConfigDict, process_count: int) -> int:
    if cfg.data.batch_size % process_count:
        raise DataError(
            f"--config.data.batch_size={cfg.data.batch_size} is not divisible by the "
            f"{process_count} processes"
        )
    return cfg.data.batch_size // process_count


class PackedBatchIterator:
    """Infinite, deterministic batches of packed rows; the state is the number of batches taken.

    next() -> {feature: [batch, seq_len]}; get_state() -> JSON dict; set_state(state) resumes so
    that the next batch is exactly the one the saved iterator would have produced.
    """

    def __init__(self, rows: dict[str, np.ndarray], batch: int, seed: int, host: int, key: str):
        self._rows = rows
        self._host = host
        self._n = int(rows["targets"].shape[0])
        self._batch = batch
        self._seed = seed
        self._key = key
        self._step = 0
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            rng = np.random.Generator(np.random.PCG64([self._seed, self._host, epoch]))
            self._perms[epoch] = rng.permutation(self._n)
        return self._perms[epoch]

    def __iter__(self) -> PackedBatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        start = self._step * self._batch
        first, last = start // self._n, (start + self._batch - 1) // self._n
        if first == last:
            offset = start - first * self._n
            idx = self._perm(first)[offset : offset + self._batch]
        else:
            pos = np.arange(start, start + self._batch)
            idx = np.array([self._perm(int(p // self._n))[p % self._n] for p in pos])
        self._step += 1
        return {k: np.asarray(v[idx]) for k, v in self._rows.items()}

    def get_state(self) -> dict:
        return {"step": self._step, "rows": self._n, "seed": self._seed, "key": self._key}

    def set_state(self, state: dict) -> None:
        if state.get("key") != self._key or state.get("rows") != self._n:
            logging.warning(
                "data: resuming an iterator saved for different data (%s rows, key %s; now %s "
                "rows, key %s): the batch order will differ",
                state.get("rows"),
                state.get("key"),
                self._n,
                self._key,
            )
        self._step = int(state["step"])


def make_train_iterator(
    cfg: ml_collections.ConfigDict,
    vocab: seqio.Vocabulary,
    workdir: str,
    process_index: int = 0,
    process_count: int = 1,
) -> PackedBatchIterator:
    """This host's infinite stream of training batches, each [batch_size // process_count,
    seq_len] per feature, from its own shard of the train documents."""
    batch = _per_host_batch(cfg, process_count)
    rows, _ = load_packed_rows(cfg, vocab, workdir, "train", process_index, process_count)
    key = _cache_key(cfg, vocab, "train", process_index, process_count)
    return PackedBatchIterator(rows, batch, int(cfg.data.shuffle_seed), process_index, key)


def make_eval_batches(
    cfg: ml_collections.ConfigDict,
    vocab: seqio.Vocabulary,
    workdir: str,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
    """`num_batches` validation batches [batch // process_count, seq_len], the same every call.

    Rows are taken in order and wrap around when the validation split is smaller than
    num_batches batches, so every host returns the same number of batches.
    """
    batch = _per_host_batch(cfg, process_count)
    rows, meta = load_packed_rows(cfg, vocab, workdir, "validation", process_index, process_count)
    idx = np.arange(num_batches * batch) % meta["rows"]
    return [
        {k: np.asarray(v[idx[i * batch : (i + 1) * batch]]) for k, v in rows.items()}
        for i in range(num_batches)
    ]


def validation_bytes_per_token(
    cfg: ml_collections.ConfigDict, vocab: seqio.Vocabulary, workdir: str
) -> float:
    """UTF-8 bytes per target token (EOS included) over the whole validation split.

    bits per byte = mean loss per token (nats) / ln 2 / this.
    """
    rows, meta = load_packed_rows(cfg, vocab, workdir, "validation", 0, 1)
    n_bytes = meta["bytes"]
    if cfg.data.source == "task":  # No raw text: decode each packed piece (EOS dropped).
        n_bytes = 0
        for targets, segs in zip(np.asarray(rows["targets"]), np.asarray(rows["segment_ids"])):
            for s in np.unique(segs[segs > 0]):
                ids = [int(t) for t in targets[segs == s] if t != vocab.eos_id]
                n_bytes += len(vocab.decode(ids).encode("utf-8"))
    return n_bytes / meta["tokens"]
