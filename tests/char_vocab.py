"""A small character-level SentencePiece vocabulary for tests that need exact token ids."""

import io

import sentencepiece as spm

from lm.tokenizer.vocab import SentencePieceVocab


def char_vocab(
    directory, name: str, specials: list[str], corpus: list[str], spare: int
) -> SentencePieceVocab:
    """A char model (bytes for unseen characters) with lm's fixed ids (pad 0, eos 1, unk 2,
    bos 3), `specials` as single pieces from id 4 on and `spare` pieces for `corpus`'s
    characters, written to `<directory>/<name>.model`."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        model_type="char",
        vocab_size=4 + len(specials) + 256 + spare,
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=3,
        user_defined_symbols=specials,
        hard_vocab_limit=False,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        minloglevel=2,
    )
    path = directory / f"{name}.model"
    path.write_bytes(model.getvalue())
    return SentencePieceVocab(str(path))
