"""A Hugging Face tokenizer (`tokenizer.json`) with the interface of `SentencePieceVocab`.

Why: a model imported with `lm convert --from_hf` must sample and train with its own
tokenizer. The trainer only needs ids, sizes and decode, so this wraps `tokenizers.Tokenizer`
(Rust, no transformers, no TensorFlow) with the attribute names the rest of lm reads:
vocab_size, encode, decode (cut at EOS), eos_id, pad_id, bos_id, unk_id, digest.

Special tokens come from `tokenizer_config.json` (bos_token, eos_token, ...) and then from
`config.json` (bos_token_id, ...) beside `tokenizer.json`; `bos_id` is None for a model that
has no BOS (Qwen2). `vocab_size` is the model's embedding rows when a `config.json` says so
(Hugging Face pads the embedding past the tokenizer, e.g. Qwen2 151936 rows, 151646 tokens), so a
model built from `vocab_size` has the checkpoint's shapes.
"""

from __future__ import annotations

import hashlib
import os

from lm import jsonio, storage
from lm.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
# Tried, in order, when neither tokenizer_config.json nor config.json names an EOS token.
_EOS_FALLBACKS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>")


def is_hf_tokenizer(path: str) -> bool:
    """Whether `path` is a `tokenizer.json` file or a directory holding one (and no spm.model)."""
    path = os.fspath(path)
    if not path:
        return False
    if path.endswith(".json"):
        return True
    return (
        storage.isdir(path)
        and storage.exists(storage.join(path, TOKENIZER_FILE))
        and not storage.exists(storage.join(path, "spm.model"))
    )


def tokenizer_json_path(path: str) -> str:
    """The `tokenizer.json` file of `path` (the file itself, or a directory holding it)."""
    path = os.fspath(path)
    if storage.isdir(path):
        path = storage.join(path, TOKENIZER_FILE)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"Hugging Face tokenizer {path!r} not found (set --config.tokenizer.path)"
        )
    return path


def _read_json(path: str) -> dict:
    if not storage.exists(path):
        return {}
    try:
        data = jsonio.loads(storage.read_bytes(path))
    except jsonio.JSONError as e:
        raise ConfigError(f"{path} is not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


def _content(token) -> str | None:
    """A special token of tokenizer_config.json: a string, or {"content": ...} (AddedToken)."""
    if isinstance(token, dict):
        token = token.get("content")
    return token if isinstance(token, str) and token else None


class HFVocab:
    """`tokenizer.json` (+ tokenizer_config.json / config.json beside it) as an lm vocabulary.

    vocab_size = the model's embedding rows (config.json `vocab_size`, else the tokenizer's
    size) + `extra_ids`; ids past the tokenizer's own (embedding padding, extra ids) decode to
    nothing.
    """

    def __init__(self, path: str, extra_ids: int = 0):
        from tokenizers import Tokenizer

        self.tokenizer_file = tokenizer_json_path(path)
        self._bytes = storage.read_bytes(self.tokenizer_file)
        try:
            self._tok = Tokenizer.from_str(self._bytes.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exceptions for malformed files
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise ConfigError(f"{self.tokenizer_file} is not a tokenizers file: {first}") from None
        directory = os.path.dirname(self.tokenizer_file)
        self._tok_cfg = _read_json(storage.join(directory, "tokenizer_config.json"))
        self._model_cfg = _read_json(storage.join(directory, "config.json"))
        self.extra_ids = int(extra_ids)
        self.base_vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        rows = self._model_cfg.get("vocab_size")
        model_rows = int(rows) if isinstance(rows, int) and rows > 0 else self.base_vocab_size
        self.vocab_size = model_rows + self.extra_ids
        self.bos_id = self._special("bos")
        self.eos_id = self._special("eos")
        if self.eos_id is None:
            self.eos_id = next(
                (i for i in map(self._tok.token_to_id, _EOS_FALLBACKS) if i is not None), None
            )
        if self.eos_id is None:
            raise ConfigError(
                f"{self.tokenizer_file} has no EOS token: set eos_token in a "
                "tokenizer_config.json beside it"
            )
        pad = self._special("pad")
        self.pad_id = self.eos_id if pad is None else pad
        self.unk_id = self._special("unk")
        self.prompt_start_id = self._prompt_start()

    def _prompt_start(self) -> int | None:
        """The id the tokenizer itself puts before a text (what `tokenizer(text)` gives in
        transformers), or None. tokenizer.json's post-processor decides, as in transformers 5
        and `tokenizers`: Llama 3's TemplateProcessing adds <|begin_of_text|>, GPT-2's and
        Qwen2's ByteLevel adds nothing. Without a post-processor, tokenizer_config.json's
        `add_bos_token` decides (transformers 4's Llama and Gemma tokenizers built their
        template from it)."""
        if self._tok.post_processor is None:
            return self.bos_id if self._tok_cfg.get("add_bos_token") is True else None
        # Read off the tokenizer: the ids a text gets before its own tokens.
        bare = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a", add_special_tokens=True).ids
        lead = len(full) if not bare else full.index(bare[0]) if bare[0] in full else 0
        return int(full[0]) if lead else None

    def _special(self, name: str) -> int | None:
        """The id of `<name>_token` (tokenizer_config.json), else `<name>_token_id`
        (config.json; the first of a list), else None."""
        content = _content(self._tok_cfg.get(f"{name}_token"))
        if content is not None:
            token_id = self._tok.token_to_id(content)
            if token_id is not None:
                return int(token_id)
        token_id = self._model_cfg.get(f"{name}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        return int(token_id) if isinstance(token_id, int) and token_id >= 0 else None

    @property
    def start_id(self) -> int:
        """The id packed rows start each document with: BOS, or EOS for a model without one
        (documents then follow an end-of-text token, as GPT-2 and Qwen2 were trained)."""
        return self.eos_id if self.bos_id is None else self.bos_id

    @property
    def digest(self) -> str:
        return hashlib.sha256(self._bytes).hexdigest()

    @property
    def tokenizer(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without the special tokens a post-processor would add (callers
        add BOS / EOS themselves)."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        """Text of `ids`, cut at the first EOS; ids past the tokenizer's own are dropped."""
        out = []
        for i in (int(t) for t in ids):
            if i == self.eos_id:
                break
            if 0 <= i < self.base_vocab_size:
                out.append(i)
        return self._tok.decode(out, skip_special_tokens=False)
