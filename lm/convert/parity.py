"""Logit parity between an imported workdir and the transformers model it came from.

Why here: the parity tests (tests/test_convert.py) and the table in the closing notes
(benchmarks/parity_table.py) measure the same thing, so both call these. Needs torch and
transformers (the dev extras); nothing else in lm imports this module.

`tiny_model(family, out_dir)` builds a small transformers model of each supported family from
its config with seeded random weights (no download) plus a small byte-level BPE tokenizer, and
saves both with `save_pretrained`.
"""

from __future__ import annotations

import json
import os

import numpy as np

# The parity bounds (issue 10): our float32 logits against transformers' float32 ones, and our
# bfloat16 compute (float32 params) against the same float32 reference.
FP32_MAX_ABS = 1e-4
BF16_MAX_KL = 0.015

VOCAB = 300  # model vocab; the tokenizer has fewer tokens (HF pads embeddings the same way)
SEQ = 24
# Larger than transformers' 0.02 so the logits spread out (a near-uniform softmax would hide
# differences) and the routers of Mixtral see clear top-k margins.
INIT_STD = 0.08

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=INIT_STD,
)

# family name -> (transformers config class, its kwargs)
TINY = {
    "gpt2": (
        "GPT2Config",
        dict(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            initializer_range=INIT_STD,
        ),
    ),
    "llama": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=False)),
    "llama_tied": ("LlamaConfig", dict(_COMMON, tie_word_embeddings=True)),
    # A window of 8 < SEQ: positions past 8 see only their last 8 tokens.
    "mistral": ("MistralConfig", dict(_COMMON, sliding_window=8, tie_word_embeddings=False)),
    "mixtral": (
        "MixtralConfig",
        dict(
            _COMMON,
            intermediate_size=64,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
        ),
    ),
    "qwen2": ("Qwen2Config", dict(_COMMON, tie_word_embeddings=False, bos_token_id=None)),
}
_MODEL_CLASS = {
    "GPT2Config": "GPT2LMHeadModel",
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "MixtralConfig": "MixtralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
}

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "import os\nprint(os.getcwd())\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n",
]


def _bpe(specials: list[str]):
    """A byte-level BPE `tokenizers.Tokenizer` trained on TEXTS, `specials` added last."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 12,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.add_special_tokens(specials)
    return tok


def _save_tokenizer(tok, out_dir: str, config: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


def tiny_tokenizer(out_dir: str, bos: bool = True) -> tuple[int, int]:
    """A byte-level BPE tokenizer.json (~290 tokens) trained on a few lines of Python, with a
    tokenizer_config.json naming its special tokens (no BOS when `bos` is False, as Qwen2).
    Returns the (bos, eos) ids. As in GPT-2 and Qwen2, id 0 is an ordinary token ("!") and the
    special tokens come last. It has no post-processor: encoding adds no special token."""
    tok = _bpe(["<s>", "</s>"])
    _save_tokenizer(tok, out_dir, {"eos_token": "</s>", "bos_token": "<s>" if bos else None})
    return tok.token_to_id("<s>"), tok.token_to_id("</s>")


def gpt2_tokenizer(out_dir: str) -> int:
    """A tokenizer laid out as the released GPT-2's: one special token, `<|endoftext|>` (BOS,
    EOS and UNK alike), tokenizer.json's ByteLevel post-processor (which adds no token) and
    the tokenizer_config.json GPT2Tokenizer saves. Returns the `<|endoftext|>` id."""
    from tokenizers import processors

    tok = _bpe(["<|endoftext|>"])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    end = "<|endoftext|>"
    config = dict(
        bos_token=end, eos_token=end, unk_token=end, add_prefix_space=False,
        tokenizer_class="GPT2Tokenizer",
    )  # fmt: skip
    _save_tokenizer(tok, out_dir, config)
    return tok.token_to_id(end)


def llama3_tokenizer(out_dir: str) -> tuple[int, int]:
    """A tokenizer laid out as Llama 3's: byte-level BPE whose tokenizer.json post-processor
    (ByteLevel, then a TemplateProcessing) puts `<|begin_of_text|>` before every text, and no
    `add_bos_token` in tokenizer_config.json. Returns the (bos, eos) ids."""
    from tokenizers import processors

    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    tok = _bpe([bos, eos])
    bos_id = tok.token_to_id(bos)
    template = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
    )
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    config = dict(bos_token=bos, eos_token=eos, tokenizer_class="PreTrainedTokenizerFast")
    _save_tokenizer(tok, out_dir, config)
    return bos_id, tok.token_to_id(eos)


def tiny_model(family: str, out_dir: str, seed: int = 0, tokenizer: str = "tiny"):
    """Builds, saves (safetensors + config.json + tokenizer) and returns the transformers
    model of `family` (a TINY key), in float32 eval mode. `tokenizer`: "tiny"
    (`tiny_tokenizer`), "gpt2" (`gpt2_tokenizer`) or "llama3" (`llama3_tokenizer`)."""
    import torch
    import transformers

    config_cls, kwargs = TINY[family]
    has_bos = kwargs.get("bos_token_id", 0) is not None
    if tokenizer == "gpt2":
        bos = eos = gpt2_tokenizer(out_dir)
    elif tokenizer == "llama3":
        bos, eos = llama3_tokenizer(out_dir)
    else:
        bos, eos = tiny_tokenizer(out_dir, bos=has_bos)
    ids = dict(bos_token_id=bos if has_bos else None, eos_token_id=eos)
    if family == "gpt2":  # GPT-2's <|endoftext|> is both
        ids = dict(bos_token_id=eos, eos_token_id=eos)
    config = getattr(transformers, config_cls)(**{**kwargs, **ids})
    torch.manual_seed(seed)
    model = getattr(transformers, _MODEL_CLASS[config_cls])(config).eval()
    # transformers initializes biases to 0 and norm scales to 1, which would leave their
    # mappings (Qwen2's q/k/v biases, GPT-2's fused c_attn bias, every norm) untested: give
    # every vector parameter random values too.
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * INIT_STD)
    model.save_pretrained(out_dir)
    return model


def token_ids(batch: int = 2, seq: int = SEQ, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    """transformers' float32 logits [batch, seq, vocab] for `ids`."""
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids, dtype=torch.long)).logits.float().numpy()


def lm_logits(workdir: str, ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Our logits [batch, seq, vocab] (float32) from the workdir's newest checkpoint, computed
    in `dtype` (params stay in their float32 storage)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from lm.training.restore import restore_params
    from lm.training.train_step import abstract_model

    _, params, mc, _, _ = restore_params(workdir)
    mc = dataclasses.replace(mc, dtype=jnp.dtype(dtype))
    graphdef, _ = abstract_model(mc)
    model = nnx.merge(graphdef, params)
    batch, seq = ids.shape
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    logits, _ = jax.jit(lambda t: model(t, positions, jnp.ones_like(t)))(jnp.asarray(ids))
    return np.asarray(logits, np.float32)


def compare(reference: np.ndarray, ours: np.ndarray) -> dict:
    """max |dlogit| and the mean KL(reference || ours) over positions (nats)."""

    def log_softmax(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(reference), log_softmax(ours)
    kl = (np.exp(p) * (p - q)).sum(-1)
    return {"max_abs": float(np.abs(reference - ours).max()), "kl": float(kl.mean())}


def markdown_table(rows: list[dict]) -> str:
    """Rows {family, dtype, max_abs, kl} as the closing note's markdown table, each checked
    against its bound (`within_bounds`)."""
    lines = [
        "| family | our dtype (HF fp32) | max abs dlogit | mean KL (nats) | within bound |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        ok = within_bounds(r["dtype"], r)
        lines.append(
            f"| {r['family']} | {r['dtype']} | {r['max_abs']:.2e} | {r['kl']:.2e} | "
            f"{'yes' if ok else 'NO'} |"
        )
    return "\n".join(lines)


def within_bounds(dtype: str, measured: dict) -> bool:
    """float32: max |dlogit| <= FP32_MAX_ABS; bfloat16: mean KL <= BF16_MAX_KL."""
    if dtype == "float32":
        return measured["max_abs"] <= FP32_MAX_ABS
    return measured["kl"] <= BF16_MAX_KL
