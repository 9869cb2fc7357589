"""A seqio Vocabulary over a Hugging Face `tokenizer.json`, for `lm data pack` only.

Why: packing runs seqio Tasks whose `tokenize` preprocessor calls `vocab.encode_tf` inside a
tf.data graph. This class encodes with the Hugging Face tokenizer itself (through
`tf.numpy_function`, so the ids are exactly `HFVocab.encode`'s), which lets a model imported
with `lm convert` train on the same corpora as a SentencePiece one. Imports TensorFlow: never
import it from the trainer process.
"""

from __future__ import annotations

import numpy as np
import seqio
import tensorflow as tf

from lm.tokenizer.hf_vocab import HFVocab


class HFSeqioVocabulary(seqio.Vocabulary):
    """`HFVocab` with seqio's interface; `start_id` is the id each packed document starts with.

    Id 0 is a real token of most Hugging Face vocabularies (GPT-2's and Qwen2's "!"), but
    seqio's packing takes 0 for padding: it cuts an example to its count of non-zero ids (so
    a 0 inside a document drops its last tokens, EOS included) and zeroes the segment id
    there. `encode_tf` therefore writes id 0 as `PACKING_ZERO` (-1), and the packing step
    (lm/data/pipeline.py) turns it back into 0 once the rows are packed.
    """

    PACKING_ZERO = -1

    def __init__(self, path: str, extra_ids: int = 0):
        self._vocab = HFVocab(path, 0)
        super().__init__(extra_ids=extra_ids)
        self.tokenizer_file = self._vocab.tokenizer_file

    @property
    def bos_id(self) -> int | None:
        return self._vocab.bos_id

    @property
    def eos_id(self) -> int:
        return self._vocab.eos_id

    @property
    def pad_id(self) -> int:
        return self._vocab.pad_id

    @property
    def unk_id(self) -> int | None:
        return self._vocab.unk_id

    @property
    def start_id(self) -> int:
        return self._vocab.start_id

    @property
    def prompt_start_id(self) -> int | None:
        """The id before a prompt (the tokenizer's own convention; see HFVocab)."""
        return self._vocab.prompt_start_id

    @property
    def _base_vocab_size(self) -> int:
        return self._vocab.vocab_size

    def _encode(self, s: str) -> list[int]:
        return self._vocab.encode(s)

    def _decode(self, ids) -> str:
        return self._vocab.decode([0 if int(i) == self.PACKING_ZERO else i for i in ids])

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        """Scalar string -> int32 [n]."""

        def encode(text: bytes) -> np.ndarray:
            ids = np.asarray(self._vocab.encode(text.decode("utf-8")), np.int32)
            return np.where(ids == 0, self.PACKING_ZERO, ids).astype(np.int32)

        ids = tf.numpy_function(encode, [s], tf.int32, stateful=False)
        return tf.ensure_shape(ids, [None])

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """int [n] -> scalar string, or int [batch, n] -> string [batch]."""

        def decode(x: np.ndarray) -> np.ndarray:
            x = np.where(x == self.PACKING_ZERO, 0, x)
            if x.ndim == 1:
                return np.asarray(self._vocab.decode(x.tolist()).encode("utf-8"), object)
            return np.asarray([self._vocab.decode(r.tolist()).encode("utf-8") for r in x], object)

        out = tf.numpy_function(decode, [ids], tf.string, stateful=False)
        return tf.ensure_shape(out, ids.shape[:-1])

    def __eq__(self, other) -> bool:
        """Equal when built from the same tokenizer bytes (seqio compares the vocabularies of
        a Mixture's Tasks)."""
        if not isinstance(other, HFSeqioVocabulary):
            return False
        return self._vocab.digest == other._vocab.digest and self.extra_ids == other.extra_ids

    def __hash__(self) -> int:
        return hash((self._vocab.digest, self.extra_ids))
