"""Validation metrics: loss over fixed batches, perplexity and tokenizer-independent bits/byte."""

from __future__ import annotations

import math

import jax


def bits_per_byte(loss_nats_per_token: float, bytes_per_token: float) -> float:
    """Converts a per-token cross-entropy in nats into bits per UTF-8 byte.

    Tokenizer-independent: bits/byte = loss / ln 2 / (bytes per token). Lets runs with different
    vocabularies be compared.
    """
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token must be positive, got {bytes_per_token}")
    return float(loss_nats_per_token) / math.log(2.0) / float(bytes_per_token)


def perplexity(loss_nats_per_token: float) -> float:
    """exp(loss); inf instead of an OverflowError for diverged runs."""
    try:
        return math.exp(float(loss_nats_per_token))
    except OverflowError:
        return math.inf


def evaluate(trainer, params, batches: list[dict], bytes_per_token: float | None) -> dict:
    """Validation loss (nats/token), perplexity and bits per byte over fixed batches.

    The masked objectives predict corrupted positions, not the text's next token, so they have
    no bits per byte (bytes_per_token None); their perplexity is over the predicted positions.
    Every host calls this with its own share of the rows; the sums are global.
    """
    loss_sum = weight_sum = 0.0
    for batch in batches:
        out = jax.device_get(trainer.eval_step(params, trainer.device_batch(batch)))
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
    loss = loss_sum / max(weight_sum, 1.0)
    out = {"loss": loss, "perplexity": perplexity(loss), "tokens": weight_sum}
    if bytes_per_token is not None:
        out["bits_per_byte"] = bits_per_byte(loss, bytes_per_token)
    return out
