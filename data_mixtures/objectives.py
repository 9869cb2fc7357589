"""Masked training objectives as seqio preprocessors, and packed rows for each of them.

`data.objective` picks what a training row asks the model to do:

  lm               next-token prediction over packed pieces (the pipeline's own path).
  mlm              BERT-style masked LM for a bidirectional-attention model: 15% of the tokens
                   are selected; of those 80% become the mask id, 10% a random token, 10% stay;
                   the loss is taken on the selected positions only.
  span_corruption  T5-style: 15% of the tokens, in spans of mean length 3, are each replaced by
                   one sentinel in the inputs; the targets list every span after its sentinel.
                   Trained here as a decoder-only prefix LM over [inputs ; targets].

Both masked objectives use ids that the SentencePiece model does not have: seqio's extra ids,
appended after the base vocabulary (`seqio.SentencePieceVocabulary(path, extra_ids=N)`).
Extra id i (0-based) is `vocab_size - 1 - i`: sentinel i of span corruption, and extra id 0 is
the MLM mask id. Randomness is stateless, keyed by (seed, index of the example in the dataset),
so a dataset gives identical examples however often and in whichever process it is iterated.
"""

from __future__ import annotations

import seqio
import tensorflow as tf

from data_mixtures.text import split_to_pieces
from lm.data.objective_names import OBJECTIVES, validate_objective  # noqa: F401
from lm.tokenizer.sentencepiece_tokenizer import BOS_ID, EOS_ID

# Ids below this are pad / eos / unk / bos: never drawn as MLM random replacements.
FIRST_NORMAL_ID = 4
_ABSENT = -1  # Placeholder for "no token here" before a boolean_mask compacts a sequence.


def _example_seeds(seed: int, index: tf.Tensor, count: int) -> tf.Tensor:
    """[count, 2] independent stateless seeds for example number `index`."""
    key = tf.stack([tf.constant(seed, tf.int64), tf.cast(index, tf.int64)])
    return tf.random.experimental.stateless_split(key, num=count)


def _round(x: tf.Tensor) -> tf.Tensor:
    """Python's round() on float64 (half to even), so TF and the Python length maths agree."""
    return tf.cast(tf.round(x), tf.int32)


# ---------------------------------------------------------------- MLM


def mlm_mask_id(vocab: seqio.Vocabulary) -> int:
    """The MLM mask id: extra id 0 (`vocab_size - 1`), which no text ever tokenizes to."""
    if vocab.extra_ids < 1:
        raise ValueError(
            "objective mlm needs a mask id: set --config.tokenizer.extra_ids >= 1 (the vocabulary "
            "has no extra ids)"
        )
    return vocab.vocab_size - 1


def mlm_mask(
    dataset: tf.data.Dataset,
    sequence_length: dict[str, int] | None,
    output_features: dict[str, seqio.Feature],
    *,
    mask_id: int,
    noise_density: float = 0.15,
    seed: int = 0,
) -> tf.data.Dataset:
    """BERT-style corruption of {"targets": int32 [n]} examples.

    Selects exactly round(n * noise_density) positions (at least 1 when n > 1), never an EOS,
    uniformly at random. Each selected position independently becomes `mask_id` with
    probability 0.8, a random id from [4, base vocab size) with 0.1, or stays as it is with 0.1.
    The random ids exclude the special ids 0-3 and the extra ids (the mask id and sentinels),
    which never appear in text. The unchanged 10% still count in the loss, so the model cannot
    tell from the input which tokens it is graded on.

    Output: {"inputs": int32 [n] corrupted, "targets": int32 [n] original,
             "mlm_weights": float32 [n] 1.0 at the selected positions, else 0.0}.
    """
    del sequence_length
    vocab = output_features["targets"].vocabulary
    random_limit = vocab.vocab_size - vocab.extra_ids

    def corrupt(index, ex):
        tokens = ex["targets"]
        n = tf.size(tokens)
        pick, action, replace = tf.unstack(_example_seeds(seed, index, 3))
        candidate = tf.not_equal(tokens, EOS_ID)
        k = _round(tf.cast(n, tf.float64) * noise_density)
        k = tf.where(n > 1, tf.maximum(k, 1), k)
        k = tf.minimum(k, tf.reduce_sum(tf.cast(candidate, tf.int32)))
        # The k largest of n uniform scores, EOS scored below all others: a uniform k-subset.
        scores = tf.where(candidate, tf.random.stateless_uniform([n], pick), -1.0)
        chosen = tf.math.top_k(scores, k).indices
        selected = tf.scatter_nd(chosen[:, None], tf.ones([k], tf.int32), [n]) > 0
        u = tf.random.stateless_uniform([n], action)
        random_ids = tf.random.stateless_uniform(
            [n], replace, minval=FIRST_NORMAL_ID, maxval=random_limit, dtype=tf.int32
        )
        inputs = tf.where(selected & (u < 0.8), tf.cast(mask_id, tokens.dtype), tokens)
        inputs = tf.where(
            selected & (u >= 0.8) & (u < 0.9), tf.cast(random_ids, tokens.dtype), inputs
        )
        return {"inputs": inputs, "targets": tokens, "mlm_weights": tf.cast(selected, tf.float32)}

    return dataset.enumerate().map(corrupt, num_parallel_calls=tf.data.AUTOTUNE)


# ---------------------------------------------------------------- span corruption


def _span_counts(n: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for n >= 2 content tokens; mirrors `_span_counts_tf`."""
    num_noise = min(max(round(n * noise_density), 1), n - 1)
    num_spans = min(max(round(num_noise / mean_noise_span_length), 1), num_noise, n - num_noise)
    return num_noise, num_spans


def _span_counts_tf(
    n: tf.Tensor, noise_density: float, mean_noise_span_length: float
) -> tuple[tf.Tensor, tf.Tensor]:
    num_noise = tf.clip_by_value(_round(tf.cast(n, tf.float64) * noise_density), 1, n - 1)
    num_spans = _round(tf.cast(num_noise, tf.float64) / mean_noise_span_length)
    num_spans = tf.minimum(tf.maximum(num_spans, 1), tf.minimum(num_noise, n - num_noise))
    return num_noise, num_spans


def _max_spans(max_len: int, noise_density: float, mean_noise_span_length: float) -> int:
    """The most noise spans any piece of at most `max_len` tokens can have."""
    counts = (
        _span_counts(n, noise_density, mean_noise_span_length)[1] for n in range(2, max_len + 1)
    )
    return max(counts, default=0)


def _check_extra_ids(vocab: seqio.Vocabulary, num_spans: int) -> None:
    if num_spans > vocab.extra_ids:
        raise ValueError(
            f"span_corruption needs up to {num_spans} sentinel ids but the vocabulary has "
            f"{vocab.extra_ids} extra ids: set --config.tokenizer.extra_ids >= {num_spans}"
        )


def _random_partition(total: tf.Tensor, parts: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """[parts] positive lengths summing to `total` (1 <= parts <= total), uniformly over all
    such compositions: `parts - 1` distinct cut points drawn from the `total - 1` gaps."""
    scores = tf.random.stateless_uniform([total - 1], seed)
    cuts = tf.sort(tf.math.top_k(scores, parts - 1).indices + 1)
    bounds = tf.concat([[0], cuts, [total]], axis=0)
    return bounds[1:] - bounds[:-1]


def span_corruption(
    dataset: tf.data.Dataset,
    sequence_length: dict[str, int] | None,
    output_features: dict[str, seqio.Feature],
    *,
    noise_density: float = 0.15,
    mean_noise_span_length: float = 3.0,
    seed: int = 0,
) -> tf.data.Dataset:
    """T5-style span corruption of {"targets": int32 [m]} pieces.

    A piece's trailing EOS (present on the last piece of each document) is never noise: it is
    held out, the n content tokens before it are corrupted, and it is put back at the end of
    the inputs, so the inputs still say where the document ended. Of the n content tokens,
    num_noise = round(n * noise_density) (clipped to [1, n - 1]) are noise, in
    num_spans = round(num_noise / mean_noise_span_length) (at least 1) spans. Noise and
    non-noise tokens are each split into num_spans non-empty runs of random lengths, and the
    runs alternate non-noise, noise, non-noise, ..., noise (so the last content token is
    always noise). Span i is replaced in the inputs by sentinel i = vocab_size - 1 - i.

    Output: {"inputs": int32 [n - num_noise + num_spans (+ 1 if the piece ended in EOS)],
             "targets": int32 [num_noise + num_spans + 1]: sentinel 0, span 0, sentinel 1,
             span 1, ..., EOS}.
    E.g. content [a b c d e f g h] + EOS, noise spans (c d) and (g h):
      inputs  [a b S0 e f S1 EOS]      targets [S0 c d S1 g h EOS]

    Pieces with fewer than 2 content tokens cannot hold a noise and a non-noise token and
    are dropped. If `sequence_length["targets"]` is given it bounds the piece length and the
    sentinel budget is checked up front (ValueError); longer pieces are checked when run.
    """
    vocab = output_features["targets"].vocabulary
    if sequence_length and sequence_length.get("targets"):
        max_len = sequence_length["targets"]
        _check_extra_ids(vocab, _max_spans(max_len, noise_density, mean_noise_span_length))
    vocab_size, extra_ids = vocab.vocab_size, vocab.extra_ids

    def ends_in_eos(tokens):
        return tf.cast(tf.reduce_any(tokens[-1:] == EOS_ID), tf.int32)

    def long_enough(ex):
        return tf.size(ex["targets"]) - ends_in_eos(ex["targets"]) >= 2

    def corrupt(index, ex):
        tokens = ex["targets"]
        eos = ends_in_eos(tokens)
        content = tokens[: tf.size(tokens) - eos]
        n = tf.size(content)
        num_noise, num_spans = _span_counts_tf(n, noise_density, mean_noise_span_length)
        tf.debugging.assert_less_equal(
            num_spans,
            extra_ids,
            message="span_corruption needs more sentinel ids than the vocabulary has extra ids: "
            "raise --config.tokenizer.extra_ids",
        )
        noise_seed, keep_seed = tf.unstack(_example_seeds(seed, index, 2))
        noise_lengths = _random_partition(num_noise, num_spans, noise_seed)
        keep_lengths = _random_partition(n - num_noise, num_spans, keep_seed)
        run_lengths = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])
        run = tf.repeat(tf.range(2 * num_spans), run_lengths)  # [n] run index of each token
        is_noise = run % 2 == 1
        starts_run = tf.concat([[True], run[1:] != run[:-1]], axis=0)
        sentinel = tf.cast(vocab_size - 1 - run // 2, tokens.dtype)
        # Per token, [what comes before it, the token itself], _ABSENT where nothing: a noise
        # span's first token brings its sentinel into both sequences.
        lead = tf.where(is_noise & starts_run, sentinel, _ABSENT)
        absent = tf.fill([n], tf.cast(_ABSENT, tokens.dtype))
        inputs = tf.reshape(tf.stack([lead, tf.where(is_noise, absent, content)], 1), [-1])
        targets = tf.reshape(tf.stack([lead, tf.where(is_noise, content, absent)], 1), [-1])
        eos_ids = tf.fill([1], tf.cast(EOS_ID, tokens.dtype))
        return {
            "inputs": tf.concat([tf.boolean_mask(inputs, inputs != _ABSENT), eos_ids[:eos]], 0),
            "targets": tf.concat([tf.boolean_mask(targets, targets != _ABSENT), eos_ids], 0),
        }

    dataset = dataset.filter(long_enough).enumerate()
    return dataset.map(corrupt, num_parallel_calls=tf.data.AUTOTUNE)


def span_corruption_lengths(
    seq_len: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int, int]:
    """(raw_len, inputs_len, targets_len): the longest raw piece such that every piece of at
    most raw_len tokens, with or without a trailing EOS, gives inputs of at most inputs_len
    and targets of at most targets_len tokens, with inputs_len + targets_len <= seq_len: its
    prefix-LM sequence [inputs ; targets] always fits one packed row. About 0.9 * seq_len."""
    best = None
    max_inputs = max_targets = 0
    for raw in range(1, seq_len + 1):
        for eos in (0, 1):
            n = raw - eos
            if n >= 2:
                noise, spans = _span_counts(n, noise_density, mean_noise_span_length)
                max_inputs = max(max_inputs, n - noise + spans + eos)
                max_targets = max(max_targets, noise + spans + 1)
        if max_inputs + max_targets > seq_len:
            break
        if max_inputs:
            best = (raw, max_inputs, max_targets)
    if best is None:
        raise ValueError(f"data.seq_len={seq_len} is too short for span corruption")
    return best


# ---------------------------------------------------------------- packed rows


def _packed_mlm_rows(
    ds: tf.data.Dataset, seq_len: int, vocab: seqio.Vocabulary, seed: int
) -> tf.data.Dataset:
    features = {"targets": seqio.Feature(vocab)}
    ds = mlm_mask(ds, {"targets": seq_len}, features, mask_id=mlm_mask_id(vocab), seed=seed)
    # seqio's packer keeps only the first (count of non-zero) entries of each feature, so the
    # 0/1 weights travel as 1/2 and come back as 0/1 (packing pads with 0).
    ds = ds.map(
        lambda ex: {
            "inputs": ex["inputs"],
            "targets": ex["targets"],
            "selected": tf.cast(ex["mlm_weights"], tf.int32) + 1,
        }
    )
    lengths = {"inputs": seq_len, "targets": seq_len, "selected": seq_len}
    ds = seqio.utils.trim_and_pack_dataset(ds, lengths)
    return ds.map(
        lambda ex: {
            "inputs": ex["inputs"],
            "targets": ex["targets"],
            "segment_ids": ex["targets_segment_ids"],
            "positions": ex["targets_positions"],
            "weights": tf.cast(tf.maximum(ex["selected"] - 1, 0), tf.float32),
        }
    )


def _packed_span_corruption_rows(
    ds: tf.data.Dataset, seq_len: int, vocab: seqio.Vocabulary, seed: int
) -> tf.data.Dataset:
    raw_len, _, targets_len = span_corruption_lengths(seq_len)
    features = {"targets": seqio.Feature(vocab)}
    ds = split_to_pieces(ds, {"targets": raw_len}, features)
    ds = span_corruption(ds, {"targets": raw_len}, features, seed=seed)
    converter = seqio.PrefixLMFeatureConverter(pack=True, loss_on_targets_only=True, bos_id=BOS_ID)
    ds = converter(ds, {"inputs": seq_len - targets_len, "targets": targets_len})
    # seqio puts a BOS on the first padding position too (it starts a "segment" 0): clear it so
    # that padding is 0 in every feature.
    return ds.map(
        lambda ex: {
            "inputs": ex["decoder_input_tokens"] * tf.sign(ex["decoder_segment_ids"]),
            "targets": ex["decoder_target_tokens"],
            "segment_ids": ex["decoder_segment_ids"],
            "positions": ex["decoder_positions"],
            "weights": tf.cast(ex["decoder_loss_weights"], tf.float32),
            "prefix": ex["decoder_causal_attention"],
        }
    )


def packed_objective_rows(
    ds: tf.data.Dataset, objective: str, seq_len: int, vocab: seqio.Vocabulary, seed: int
) -> tf.data.Dataset:
    """Packed, unbatched rows {key: [seq_len]} of a masked objective, from document pieces.

    `ds` yields {"targets": int32 [<= seq_len]}, the last piece of each document ending in
    EOS. Rows hold whole examples (never a cut one), each its own segment; segment_ids are
    1, 2, ... per example and 0 on padding, positions restart at 0 in every segment. The
    masks are keyed by `seed` and the example's index in `ds`: give each host's shard its own
    seed if the shards should not share mask patterns.

    objective "mlm" (the model attends bidirectionally within a segment; nothing is shifted):
      inputs      int32   the corrupted tokens (mask id = `mlm_mask_id(vocab)`)
      targets     int32   the original tokens at the same positions
      segment_ids int32
      positions   int32
      weights     float32 1.0 exactly at the ~15% selected positions

    objective "span_corruption" (a decoder-only prefix LM over [span inputs ; span targets],
    pieces first re-cut to `span_corruption_lengths(seq_len)[0]` tokens so that each fits):
      inputs      int32   decoder inputs: BOS (id 3), then the sequence shifted right by one
      targets     int32   the sequence [span inputs ; span targets] to predict
      segment_ids int32
      positions   int32
      weights     float32 1.0 on the span-targets part only (sentinels, span tokens, EOS)
      prefix      int32   1 where attention may be bidirectional: the positions whose input is
                          BOS or a span-inputs token (span-inputs length + 1 per segment)
    Example (sentinels S0 = vocab_size - 1, S1 = vocab_size - 2), one segment:
      span inputs [a b S0 e f S1 EOS], span targets [S0 c d S1 g h EOS]
      inputs      BOS a b S0 e f S1 EOS S0 c d S1 g h
      targets     a b S0 e f S1 EOS S0 c d S1 g h EOS
      weights     0 0 0  0 0 0  0   1  1 1 1  1 1 1
      prefix      1 1 1  1 1 1  1   1  0 0 0  0 0 0
    The position with prefix 1 and weight 1 reads the last span-inputs token and predicts S0.

    objective "lm" is not handled here: the pipeline packs it with seqio's
    DecoderFeatureConverter. ValueError for it, for an unknown objective, and when the
    vocabulary has too few extra ids (mask id / sentinels; fix: --config.tokenizer.extra_ids).
    """
    validate_objective(objective)
    if objective == "mlm":
        return _packed_mlm_rows(ds, seq_len, vocab, seed)
    if objective == "span_corruption":
        return _packed_span_corruption_rows(ds, seq_len, vocab, seed)
    raise ValueError(
        "objective 'lm' has no masked rows: the pipeline packs it with DecoderFeatureConverter"
    )
