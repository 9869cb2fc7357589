"""seqio Tasks over `lm.data.documents.iter_documents`: tokenize, append EOS, cut into pieces.

A Task is registered once per (data config, vocabulary file) under a name derived from a hash of
both, so registering again is free and two configs never collide. Documents are usually much
longer than one training row, so each tokenized document (EOS included) is cut into consecutive
pieces of at most `sequence_length["targets"]` tokens before packing: packing then never has to
truncate, and no token is dropped.
"""

from __future__ import annotations

import hashlib
import json
import os

import ml_collections
import seqio
import tensorflow as tf

from lm.data.documents import iter_documents
from lm.data.sources import DOC_KEYS, content_stamp
from lm.errors import DataError


def docs_fingerprint(data_cfg: ml_collections.ConfigDict) -> dict:
    """The document-defining part of the data config plus a stamp of the files' sizes and
    mtimes, as a JSON-able dict: edited data gets a new Task name and a new cache."""
    out = {k: data_cfg[k] for k in DOC_KEYS}
    out["files"] = content_stamp(data_cfg)
    if data_cfg.source in ("text", "dir", "jsonl") and data_cfg.path:
        out["path"] = os.path.abspath(data_cfg.path)
    return out


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class _ShardedDocumentSource(seqio.FunctionDataSource):
    """A FunctionDataSource whose function receives the ShardInfo, so that each host reads only
    its own documents instead of reading everything and dropping the rest."""

    def __init__(self, data_cfg: ml_collections.ConfigDict):
        self._data_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
        super().__init__(dataset_fn=self._dataset_fn_for, splits=("train", "validation"))

    def _dataset_fn_for(self, split: str, shuffle_files: bool, shard_index=0, num_shards=1):
        del shuffle_files  # Order is deterministic; the pipeline shuffles packed rows.
        cfg = self._data_cfg
        return tf.data.Dataset.from_generator(
            lambda: ({"text": d} for d in iter_documents(cfg, split, shard_index, num_shards)),
            output_signature={"text": tf.TensorSpec((), tf.string)},
        )

    @property
    def supports_arbitrary_sharding(self) -> bool:
        return True

    def get_dataset(self, split="train", shuffle=True, seed=None, shard_info=None, **kwargs):
        del seed, kwargs
        index, count = (shard_info.index, shard_info.num_shards) if shard_info else (0, 1)
        return self._dataset_fn_for(split, shuffle, index, count)


@seqio.map_over_dataset
def _rekey_text(ex):
    return {"targets": ex["text"]}


def split_to_pieces(dataset: tf.data.Dataset, sequence_length, output_features) -> tf.data.Dataset:
    """Cuts each example's "targets" [n] into consecutive pieces [<= L] (L = targets length).

    Runs after EOS is appended, so the EOS stays at the very end of the document.
    """
    del output_features
    max_len = sequence_length["targets"] if sequence_length else None
    if not max_len:
        return dataset

    def cut(ex):
        tokens = ex["targets"]
        n = tf.shape(tokens, out_type=tf.int64)[0]
        starts = tf.range(0, n, max_len, dtype=tf.int64)
        lengths = tf.minimum(tf.cast(max_len, tf.int64), n - starts)
        pieces = tf.RaggedTensor.from_row_lengths(tokens, lengths)
        return tf.data.Dataset.from_tensor_slices({"targets": pieces})

    return dataset.flat_map(cut)


def task_name_for(data_cfg: ml_collections.ConfigDict, vocab_path: str) -> str:
    key = json.dumps(
        {"docs": docs_fingerprint(data_cfg), "vocab": file_sha256(vocab_path)}, sort_keys=True
    )
    return f"lm_text_{data_cfg.source}_{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def register_text_task(data_cfg: ml_collections.ConfigDict, vocab_path: str) -> str:
    """Registers (once) the seqio Task for these documents and this vocabulary; returns its name.

    Output feature "targets": tokens of one document piece, at most the targets length long,
    the last piece of each document ending in EOS.
    """
    if data_cfg.source == "task":
        raise DataError("data.source=task uses --config.data.task; nothing to register")
    if not os.path.isfile(vocab_path):
        raise FileNotFoundError(f"tokenizer file {vocab_path!r} not found")
    name = task_name_for(data_cfg, vocab_path)
    if name in seqio.TaskRegistry.names():
        return name
    from lm.tokenizer.hf_vocab import is_hf_tokenizer

    if is_hf_tokenizer(vocab_path):  # a Hugging Face tokenizer.json (an imported model's)
        from lm.tokenizer.hf_seqio import HFSeqioVocabulary

        vocab = HFSeqioVocabulary(vocab_path)
    else:
        vocab = seqio.SentencePieceVocabulary(vocab_path)
    seqio.TaskRegistry.add(
        name,
        source=_ShardedDocumentSource(data_cfg),
        preprocessors=[
            _rekey_text,
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos,
            split_to_pieces,
        ],
        output_features={"targets": seqio.Feature(vocab, add_eos=True)},
    )
    return name
