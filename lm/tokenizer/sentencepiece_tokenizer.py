"""SentencePiece tokenizers trained on the same documents the model trains on.

Ids 0..3 are reserved up front as pad=0, eos=1, unk=2, bos=3 (seqio's SentencePieceVocabulary
expects pad=0, eos=1, unk=2), followed by the configured special tokens (e.g. chat roles) as
user-defined symbols, so special ids never depend on the training text. Normalization is the
identity and whitespace is kept verbatim, so decode(encode(text)) == text for source code with
newlines, tabs and indentation (a tab is its own piece, id 4 + len(special_tokens)).

Training and measuring a tokenizer needs neither TensorFlow nor seqio (`lm tokenizer train` loads
neither, so it prints none of their start-up lines); only `load_vocabulary`, for the packing
pipeline, imports them.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import ml_collections
import sentencepiece as spm

from lm import storage
from lm.data.documents import iter_documents
from lm.data.tf_quiet import tf_cpu_only
from lm.errors import DataError

if TYPE_CHECKING:
    import seqio

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
MODEL_NAME = "spm.model"
# SentencePiece trains on "sentences"; longer documents are cut at line ends into pieces this size.
_TRAIN_PIECE_BYTES = 2048
_MAX_SENTENCE_BYTES = 16384


def special_tokens(tok_cfg: ml_collections.ConfigDict) -> list[str]:
    """The comma-separated `special_tokens` of the config, in order (ids 4, 5, ...)."""
    return [t.strip() for t in tok_cfg.special_tokens.split(",") if t.strip()]


def _training_pieces(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Documents cut at line ends into <= ~2 KB pieces, stopping after `max_bytes` of text."""
    total = 0
    for doc in docs:
        piece, size = [], 0
        for line in doc.splitlines(keepends=True):
            n = len(line.encode("utf-8"))
            if size and size + n > _TRAIN_PIECE_BYTES:
                yield "".join(piece)
                piece, size = [], 0
            if n > _MAX_SENTENCE_BYTES:  # a pathological line (minified data): keep its start.
                line = line.encode("utf-8")[:_MAX_SENTENCE_BYTES].decode("utf-8", "ignore")
                n = len(line.encode("utf-8"))
            piece.append(line)
            size += n
        if piece:
            yield "".join(piece)
        total += len(doc.encode("utf-8"))
        if max_bytes and total >= max_bytes:
            return


def train_tokenizer(
    data_cfg: ml_collections.ConfigDict, tok_cfg: ml_collections.ConfigDict, out_dir: str
) -> str:
    """Trains a SentencePiece model on the train split and returns the path of `spm.model`.

    `tok_cfg.kind` picks bpe | unigram | char; `tok_cfg.train_max_bytes` caps the text read.
    A char model whose vocab_size exceeds the distinct characters keeps only what it finds.
    """
    if tok_cfg.kind not in ("bpe", "unigram", "char"):
        raise DataError(
            f"--config.tokenizer.kind must be bpe, unigram or char, not {tok_cfg.kind!r}"
        )
    pieces = list(_training_pieces(iter_documents(data_cfg, "train"), tok_cfg.train_max_bytes))
    if not pieces:
        raise DataError(
            f"no training text for the tokenizer from data.source={data_cfg.source!r} "
            f"(path={data_cfg.path!r})"
        )
    specials = special_tokens(tok_cfg)
    vocab_size = tok_cfg.vocab_size
    if tok_cfg.kind == "char":
        # Char models cannot exceed the alphabet: shrink to the characters actually present.
        chars = set().union(*map(set, pieces)) - {" "}  # " " becomes the ▁ meta piece.
        n_bytes = 256 if tok_cfg.byte_fallback else 0
        vocab_size = min(vocab_size, 4 + len(specials) + n_bytes + len(chars) + 1)
    prefix = storage.join(out_dir, "spm")
    model = io.BytesIO()
    options = dict(
        sentence_iterator=iter(pieces),
        model_writer=model,
        model_type=tok_cfg.kind,
        vocab_size=vocab_size,
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        # SentencePiece's trainer never learns "\t" as a character; code needs it, so it is a
        # user-defined piece right after the special tokens.
        user_defined_symbols=specials + ([] if "\t" in specials else ["\t"]),
        byte_fallback=tok_cfg.byte_fallback,
        # Without byte fallback a dropped rare character would decode as unk: keep them all.
        character_coverage=0.9995 if tok_cfg.byte_fallback else 1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        max_sentence_length=_MAX_SENTENCE_BYTES * 2,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        hard_vocab_limit=tok_cfg.kind != "char",
        num_threads=max(1, min(os.cpu_count() or 1, 8)),
        minloglevel=2,
    )
    try:
        spm.SentencePieceTrainer.train(**options)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()[-1]
        hint = " (lower --config.tokenizer.vocab_size)" if "too high" in detail else ""
        raise DataError(
            f"SentencePiece training failed (kind={tok_cfg.kind}, vocab_size={vocab_size})"
            f"{hint}: {detail.split('] ')[-1]}"
        ) from None
    path = prefix + ".model"
    storage.write_bytes(path, model.getvalue())  # whole file at once (local or gs://)
    proc = spm.SentencePieceProcessor(model_proto=model.getvalue())
    storage.write_text(
        prefix + ".vocab",
        "".join(
            f"{proc.id_to_piece(i)}\t{proc.get_score(i)}\n" for i in range(proc.get_piece_size())
        ),
    )
    return path


def load_vocabulary(path: str, extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
    """A seqio vocabulary for `path` (a .model file, or a directory holding spm.model).

    `extra_ids` appends that many ids after the SentencePiece pieces (T5's sentinels; the last
    id is sentinel 0), as `tokenizer.extra_ids` asks for the masked objectives. A Hugging Face
    tokenizer.json (or a directory holding one) gives an `HFSeqioVocabulary` instead.
    """
    from lm.tokenizer.hf_vocab import is_hf_tokenizer

    tf_cpu_only()  # TensorFlow loads quietly, with the GPUs hidden, before seqio imports it
    import seqio

    if is_hf_tokenizer(path):
        from lm.tokenizer.hf_seqio import HFSeqioVocabulary

        return HFSeqioVocabulary(path, extra_ids)
    if storage.isdir(path):
        path = storage.join(path, MODEL_NAME)
    if not storage.exists(path) or storage.isdir(path):
        raise FileNotFoundError(
            f"SentencePiece model {path!r} not found (set --config.tokenizer.path or train one)"
        )
    # seqio reads the model through tf.io.gfile: give it a local copy.
    vocab = seqio.SentencePieceVocabulary(storage.local_copy(path), extra_ids=extra_ids)
    try:
        vocab.load_model()
    except Exception as e:  # protobuf/sentencepiece errors vary by version.
        raise ValueError(f"{path!r} is not a SentencePiece model: {e}") from None
    return vocab


def compression_report(vocab, texts: Iterable[str]) -> dict:
    """How well `vocab` (anything with `encode(text) -> ids`: lm.tokenizer.vocab's or seqio's)
    compresses `texts` (use held-out text, e.g. the validation split).

    Returns {"documents", "bytes", "tokens", "bytes_per_token", "unk_tokens", "unk_rate"}.
    """
    docs = n_bytes = n_tokens = n_unk = 0
    for text in texts:
        ids = list(vocab.encode(text))
        docs += 1
        n_bytes += len(text.encode("utf-8"))
        n_tokens += len(ids)
        n_unk += sum(1 for i in ids if i == UNK_ID)
    return {
        "documents": docs,
        "bytes": n_bytes,
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / n_tokens if n_tokens else 0.0,
        "unk_tokens": n_unk,
        "unk_rate": n_unk / n_tokens if n_tokens else 0.0,
    }
