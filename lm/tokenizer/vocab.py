"""The trainer's vocabulary: a SentencePiece model read with `sentencepiece` alone.

Why: seqio's SentencePieceVocabulary reads the model through tf.io.gfile, which would import
TensorFlow into the trainer process; the trainer only needs the ids, the sizes and decode (for
sampling), so this small class gives those with the same attribute names seqio uses.
"""

from __future__ import annotations

import hashlib
import os

import sentencepiece as spm

from lm import storage

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
MODEL_NAME = "spm.model"


class SentencePieceVocab:
    """vocab_size = SentencePiece pieces + `extra_ids` (T5 sentinels; the last id is sentinel 0)."""

    def __init__(self, path: str, extra_ids: int = 0):
        if storage.isdir(path):
            path = storage.join(path, MODEL_NAME)
        if not storage.exists(path):
            raise FileNotFoundError(
                f"SentencePiece model {path!r} not found (set --config.tokenizer.path or train one)"
            )
        self.sentencepiece_model_file = path
        self.sp_model = storage.read_bytes(path)
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(self.sp_model)
        except Exception as e:  # protobuf/sentencepiece errors vary by version.
            raise ValueError(f"{path!r} is not a SentencePiece model: {e}") from None
        self.extra_ids = int(extra_ids)
        self.base_vocab_size = int(self._sp.GetPieceSize())
        self.vocab_size = self.base_vocab_size + self.extra_ids
        self.pad_id, self.eos_id, self.unk_id = PAD_ID, EOS_ID, UNK_ID
        self.bos_id = BOS_ID
        # lm's own runs: every training document, and so every prompt, starts with BOS.
        self.prompt_start_id = BOS_ID

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.sp_model).hexdigest()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        """Text of `ids`, cut at the first EOS; ids outside the pieces (sentinels) become UNK."""
        out = []
        for i in (int(t) for t in ids):
            if i == self.eos_id:
                break
            out.append(i if 0 <= i < self.base_vocab_size else self.unk_id)
        return self._sp.DecodeIds(out)


def prompt_start_id(vocab) -> int | None:
    """The id put before a prompt's tokens (sampling, serving, evaluation), or None for none.

    Why not the start id packing uses: an imported model follows its own tokenizer's
    convention (`HFVocab.prompt_start_id`: GPT-2 adds nothing, Llama 3 adds
    <|begin_of_text|>), so the same string gives the same ids as in transformers; lm's
    SentencePiece runs prepend BOS, as their training documents begin. A vocabulary without
    the attribute keeps the start id of its packed documents."""
    if hasattr(vocab, "prompt_start_id"):
        return vocab.prompt_start_id
    return getattr(vocab, "start_id", vocab.bos_id)


def load_vocab(path: str, extra_ids: int = 0):
    """The TF-free vocabulary of `path`: a SentencePiece .model file (or a directory holding
    spm.model), or a Hugging Face tokenizer.json (or a directory holding one; `HFVocab`)."""
    from lm.tokenizer.hf_vocab import HFVocab, is_hf_tokenizer

    if is_hf_tokenizer(os.fspath(path)):
        return HFVocab(os.fspath(path), extra_ids)
    return SentencePieceVocab(os.fspath(path), extra_ids)
