"""Packed training batches: seqio Task + packing once, cached as .npy, served by a tiny sampler.

The seqio Task (tokenize, EOS, cut documents into <= seq_len pieces) and seqio's packing run
once per (documents, vocabulary, seq_len, split, host shard). The packed rows are cached under
`cfg.data.cache_dir` (default `<workdir>/data_cache`) in a directory named by a hash of all of
those, written atomically and reused by later runs. Serving is then a numpy gather of
`batch` rows per step, so the input pipeline costs microseconds, not a TF graph per batch.

Every batch is a dict of np.ndarray [batch_per_host, seq_len] (next-token objective):
  inputs      int32   BOS (id 3) then the targets shifted right, restarting in every segment
  targets     int32   the next token to predict (0 = padding)
  segment_ids int32   1, 2, ... per packed document piece; 0 = padding
  positions   int32   0, 1, ... restarting in each segment
  weights     float32 1.0 where the target counts in the loss
The masked objectives (`data.objective` mlm | span_corruption) fill the same features their own
way, plus `prefix` for span corruption (data_mixtures/objectives.py).

Mixtures (lm/data/mixture.py) build rows per component; the batch order and the curriculum are
in lm/data/iterator.py and lm/data/curriculum.py.
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

from lm.data import curriculum, mixture
from lm.data.iterator import FEATURES, PackedBatchIterator, batch_features
from lm.data.sources import iter_documents, tf_cpu_only
from lm.errors import DataError
from lm.tokenizer.sentencepiece_tokenizer import BOS_ID, EOS_ID

_CACHE_VERSION = 2
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
        vocab_size=vocab.vocab_size,  # extra ids (sentinels) change the objectives' rows
        seq_len=cfg.data.seq_len,
        objective=cfg.data.objective,
        difficulty=cfg.data.curriculum.difficulty if split == "train" else "none",
        seed=cfg.data.shuffle_seed,
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
        if cfg.data.task in seqio.MixtureRegistry.names():
            raise DataError(f"{cfg.data.task!r} is a seqio Mixture: read it per component")
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


def _ordered_by_difficulty(ds, difficulty: str):
    """The same pieces, whole documents reordered easiest first (curriculum)."""
    tf = tf_cpu_only()
    pieces = [ex["targets"] for ex in ds.as_numpy_iterator()]
    pieces = curriculum.order_pieces_by_difficulty(pieces, EOS_ID, difficulty)
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": p} for p in pieces),
        output_signature={"targets": tf.TensorSpec((None,), tf.int32)},
    )


def _packed_dataset(cfg, vocab, ds, shard: int):
    """Packs pieces into rows of our feature names for the configured objective (the masked
    objectives draw their noise from the shuffle seed and the host shard)."""
    if cfg.data.objective == "lm":
        converter = seqio.DecoderFeatureConverter(pack=True, bos_id=BOS_ID)
        ds = converter(ds, {"targets": cfg.data.seq_len})
        return ds.map(lambda ex: {k: ex[_CONVERTER_KEYS[k]] for k in FEATURES})
    from data_mixtures.objectives import packed_objective_rows

    return packed_objective_rows(
        ds, cfg.data.objective, cfg.data.seq_len, vocab, cfg.data.shuffle_seed * 1009 + shard
    )


def _build_rows(cfg, vocab, split: str, shard: int, count: int) -> tuple[dict, dict]:
    """Runs the Task, the curriculum order, the objective and packing.

    Returns ({feature: [rows, seq_len]}, meta).
    """
    start = time.time()
    ds = _task_dataset(cfg, vocab, split, shard, count)
    if split == "train" and cfg.data.curriculum.difficulty != "none":
        ds = _ordered_by_difficulty(ds, cfg.data.curriculum.difficulty)
    features = batch_features(cfg.data.objective)
    parts = {k: [] for k in features}
    for batch in _packed_dataset(cfg, vocab, ds, shard).batch(1024).as_numpy_iterator():
        for k in features:
            parts[k].append(batch[k])
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


def _cache_dir(cfg, vocab, workdir: str, split: str, shard: int, count: int) -> str:
    key = _cache_key(cfg, vocab, split, shard, count)
    return os.path.join(_cache_root(cfg, workdir), f"{split}-{shard}of{count}-{key}")


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
    final = _cache_dir(cfg, vocab, workdir, split, shard, count)
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
    rows = {
        k: np.load(os.path.join(final, f"{k}.npy"), mmap_mode="r")
        for k in batch_features(cfg.data.objective)
    }
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


def _component_cfg(cfg: ml_collections.ConfigDict, component: mixture.Component):
    if component.data is cfg.data:
        return cfg
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.data = component.data
    return out


def _components(cfg: ml_collections.ConfigDict, vocab: seqio.Vocabulary):
    """[(component, its cfg)] that training reads (one, unless the data is a mixture)."""
    vocab_path = getattr(vocab, "sentencepiece_model_file", "") or ""
    return [
        (c, _component_cfg(cfg, c)) for c in mixture.components_for_training(cfg.data, vocab_path)
    ]


def make_train_iterator(
    cfg: ml_collections.ConfigDict,
    vocab: seqio.Vocabulary,
    workdir: str,
    process_index: int = 0,
    process_count: int = 1,
) -> PackedBatchIterator:
    """This host's infinite stream of training batches, each [batch_size // process_count,
    seq_len] per feature (shorter rows, more of them, during sequence-length warmup), from its
    own shard of the train documents of every mixture component."""
    batch = _per_host_batch(cfg, process_count)
    schedule = curriculum.Curriculum.from_config(cfg)
    components = _components(cfg, vocab)
    rows, keys = [], []
    for _, ccfg in components:
        rows.append(
            load_packed_rows(ccfg, vocab, workdir, "train", process_index, process_count)[0]
        )
        keys.append(_cache_key(ccfg, vocab, "train", process_index, process_count))
    specs = [c for c, _ in components]
    return PackedBatchIterator(
        rows,
        lambda step: mixture.rates_at(specs, schedule.mixture_progress(step)),
        batch,
        int(cfg.data.shuffle_seed),
        process_index,
        "+".join(keys),
        schedule,
        tuple(c.name for c in specs),
    )


def _validation_shares(
    cfg, vocab, workdir: str, total: int, process_index: int, count: int, only: str | None
):
    """[(rows, meta, n)]: each component's validation rows and how many of `total` rows it
    gets (by its final rate, largest remainders first; all of them for component `only`)."""
    components = _components(cfg, vocab)
    if only is not None:
        names = [c.name for c, _ in components]
        if only not in names:
            raise DataError(f"no mixture component {only!r}; there are {names}")
        components = [(c, ccfg) for c, ccfg in components if c.name == only]
    rates = mixture.rates_at([c for c, _ in components], 1.0)
    exact = rates * total
    shares = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - shares))[: total - shares.sum()]:
        shares[i] += 1
    out = []
    for (_, ccfg), n in zip(components, shares):
        rows, meta = load_packed_rows(ccfg, vocab, workdir, "validation", process_index, count)
        out.append((rows, meta, int(n)))
    return out


def make_eval_batches(
    cfg: ml_collections.ConfigDict,
    vocab: seqio.Vocabulary,
    workdir: str,
    num_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    component: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """`num_batches` validation batches [batch // process_count, seq_len], the same every call.

    Rows are taken in order and wrap around when the validation split is smaller than
    num_batches batches, so every host returns the same number of batches. A mixture gives
    each component its final-rate share of the rows, or all of them to `component`.
    """
    batch = _per_host_batch(cfg, process_count)
    shares = _validation_shares(
        cfg, vocab, workdir, num_batches * batch, process_index, process_count, component
    )
    parts = [
        {k: np.asarray(v[np.arange(n) % meta["rows"]]) for k, v in rows.items()}
        for rows, meta, n in shares
        if n
    ]
    stacked = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return [
        {k: v[i * batch : (i + 1) * batch] for k, v in stacked.items()} for i in range(num_batches)
    ]


def _decoded_bytes(rows: dict, vocab: seqio.Vocabulary) -> int:
    """UTF-8 bytes of the packed pieces' text (EOS dropped), for sources without raw text."""
    n_bytes = 0
    for targets, segs in zip(np.asarray(rows["targets"]), np.asarray(rows["segment_ids"])):
        for s in np.unique(segs[segs > 0]):
            ids = [int(t) for t in targets[segs == s] if t != vocab.eos_id]
            n_bytes += len(vocab.decode(ids).encode("utf-8"))
    return n_bytes


def validation_bytes_per_token(
    cfg: ml_collections.ConfigDict, vocab: seqio.Vocabulary, workdir: str
) -> float:
    """UTF-8 bytes per target token (EOS included) over the validation split (a mixture
    weights its components by their final rates).

    bits per byte = mean loss per token (nats) / ln 2 / this.
    """
    components = _components(cfg, vocab)
    rates = mixture.rates_at([c for c, _ in components], 1.0)
    n_bytes = n_tokens = 0.0
    for (_, ccfg), rate in zip(components, rates):
        rows, meta = load_packed_rows(ccfg, vocab, workdir, "validation", 0, 1)
        raw = _decoded_bytes(rows, vocab) if ccfg.data.source == "task" else meta["bytes"]
        n_bytes += rate * raw
        n_tokens += rate * meta["tokens"]
    return n_bytes / n_tokens
