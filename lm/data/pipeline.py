"""The seqio side of packing (run by `lm data pack` only): Task, curriculum order, objective, rows.

Why: lm/data/pack.py turns each mixture component's split into packed rows once, in its own
process, and writes them as ArrayRecord files that the trainer reads with grain
(lm/data/packed.py); only that process imports seqio and TensorFlow. `build_rows` runs the
seqio Task (tokenize, EOS, cut documents into <= seq_len pieces), the difficulty curriculum's
document order, and seqio's packing (or a masked objective's) for one split.

Every row is, per feature, a [seq_len] array (next-token objective):
  inputs      int32   BOS (id 3; a Hugging Face tokenizer's BOS, or EOS if it has none) then
                      the targets shifted right, restarting in every segment
  targets     int32   the next token to predict (0 = padding; with a Hugging Face tokenizer,
                      where 0 is a real token, padding is where segment_ids is 0)
  segment_ids int32   1, 2, ... per packed document piece; 0 = padding
  positions   int32   0, 1, ... restarting in each segment
  weights     float32 1.0 where the target counts in the loss
The masked objectives (`data.objective` mlm | span_corruption) fill the same features their own
way, plus `prefix` for span corruption (data_mixtures/objectives.py).
"""

from __future__ import annotations

import functools
import time

import ml_collections
import numpy as np
import seqio

from lm.data import curriculum
from lm.data.documents import Component, iter_documents
from lm.data.grain_pipeline import FEATURES, batch_features
from lm.data.tf_quiet import tf_cpu_only
from lm.errors import DataError
from lm.tokenizer.sentencepiece_tokenizer import BOS_ID

_CONVERTER_KEYS = {
    "inputs": "decoder_input_tokens",
    "targets": "decoder_target_tokens",
    "segment_ids": "decoder_segment_ids",
    "positions": "decoder_positions",
    "weights": "decoder_loss_weights",
}


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
    # A SentencePiece model, or a Hugging Face tokenizer.json (HFSeqioVocabulary).
    vocab_path = getattr(vocab, "sentencepiece_model_file", None) or getattr(
        vocab, "tokenizer_file", None
    )
    if not vocab_path:
        raise DataError("the data pipeline needs a SentencePiece or Hugging Face vocabulary")
    task = seqio.get_mixture_or_task(register_text_task(cfg.data, vocab_path))
    return task.get_dataset(lengths, split=split, shuffle=False, shard_info=shard_info)


def _source_bytes(cfg, vocab, rows: dict, split: str, shard: int, count: int) -> int:
    """UTF-8 bytes of the split's text (for bits per byte): the raw documents, or for a seqio
    task (no raw text) its packed pieces decoded."""
    if cfg.data.source == "task":
        return _decoded_bytes(rows, vocab)
    return sum(len(d.encode("utf-8")) for d in iter_documents(cfg.data, split, shard, count))


def _ordered_by_difficulty(ds, vocab, difficulty: str):
    """The same pieces, whole documents reordered easiest first (curriculum).

    Documents end at the vocabulary's own EOS. A Hugging Face vocabulary's pieces carry id 0
    as `PACKING_ZERO` (see `_packed_dataset`): scored as the real id 0, packed as the marker."""
    tf = tf_cpu_only()
    zero = getattr(vocab, "PACKING_ZERO", None)
    pieces = [ex["targets"] for ex in ds.as_numpy_iterator()]
    if zero is not None:
        pieces = [np.where(p == zero, 0, p) for p in pieces]
    pieces = curriculum.order_pieces_by_difficulty(pieces, vocab.eos_id, difficulty)
    if zero is not None:  # pieces hold no padding, so every 0 is a real id 0
        pieces = [np.where(p == 0, zero, p).astype(np.int32) for p in pieces]
    return tf.data.Dataset.from_generator(
        lambda: ({"targets": p} for p in pieces),
        output_signature={"targets": tf.TensorSpec((None,), tf.int32)},
    )


def _packed_dataset(cfg, vocab, ds, shard: int):
    """Packs pieces into rows of our feature names for the configured objective (the masked
    objectives draw their noise from the shuffle seed and the host shard)."""
    start_id = getattr(vocab, "start_id", None)  # a Hugging Face tokenizer's BOS (or EOS)
    if cfg.data.objective == "lm":
        bos = BOS_ID if start_id is None else start_id
        converter = seqio.DecoderFeatureConverter(pack=True, bos_id=bos)
        ds = converter(ds, {"targets": cfg.data.seq_len})
        ds = ds.map(lambda ex: {k: ex[_CONVERTER_KEYS[k]] for k in FEATURES})
        if start_id is not None:
            ds = ds.map(functools.partial(_restore_zero_ids, zero=vocab.PACKING_ZERO))
        return ds
    if start_id is not None:
        raise DataError(
            f"data.objective={cfg.data.objective} needs a SentencePiece tokenizer (its "
            "sentinel ids); a Hugging Face tokenizer packs the lm objective only"
        )
    from data_mixtures.objectives import packed_objective_rows

    return packed_objective_rows(
        ds, cfg.data.objective, cfg.data.seq_len, vocab, cfg.data.shuffle_seed * 1009 + shard
    )


def _restore_zero_ids(ex: dict, zero: int) -> dict:
    """A Hugging Face vocabulary's id 0 went through packing as `zero` (see HFSeqioVocabulary,
    since seqio packs 0 as padding); the packed row gets the real id back, and every position
    of a segment is weighed."""
    tf = tf_cpu_only()
    out = dict(ex)
    for key in ("inputs", "targets"):
        out[key] = tf.where(ex[key] == zero, tf.zeros_like(ex[key]), ex[key])
    out["weights"] = tf.cast(ex["segment_ids"] > 0, ex["weights"].dtype)
    return out


def build_rows(
    cfg: ml_collections.ConfigDict, vocab: seqio.Vocabulary, split: str, shard: int, count: int
) -> tuple[dict[str, np.ndarray], dict]:
    """Runs the Task, the curriculum order, the objective and packing for host `shard` of
    `count` (`lm data pack` packs whole splits: 0 of 1).

    Returns ({feature: [rows, seq_len]}, meta {rows, tokens, bytes, seconds}).
    """
    start = time.time()
    ds = _task_dataset(cfg, vocab, split, shard, count)
    if split == "train" and cfg.data.curriculum.difficulty != "none":
        ds = _ordered_by_difficulty(ds, vocab, cfg.data.curriculum.difficulty)
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
    # Target tokens: non-zero targets, or (a Hugging Face vocabulary, where 0 is a real id)
    # every position of a segment.
    hf = getattr(vocab, "start_id", None) is not None
    real = rows["segment_ids"] > 0 if hf else rows["targets"] != 0
    meta = dict(
        rows=int(rows["targets"].shape[0]),
        tokens=int(real.sum()),
        bytes=_source_bytes(cfg, vocab, rows, split, shard, count),
        seconds=round(time.time() - start, 3),
    )
    return rows, meta


def _decoded_bytes(rows: dict, vocab: seqio.Vocabulary) -> int:
    """UTF-8 bytes of the packed pieces' text (EOS dropped), for sources without raw text."""
    n_bytes = 0
    for targets, segs in zip(np.asarray(rows["targets"]), np.asarray(rows["segment_ids"])):
        for s in np.unique(segs[segs > 0]):
            ids = [int(t) for t in targets[segs == s] if t != vocab.eos_id]
            n_bytes += len(vocab.decode(ids).encode("utf-8"))
    return n_bytes


def component_cfg(
    cfg: ml_collections.ConfigDict, component: Component
) -> ml_collections.ConfigDict:
    """The full config with `data` replaced by the component's own data config."""
    if component.data is cfg.data:
        return cfg
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.data = component.data
    return out
