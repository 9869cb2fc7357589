"""`generate_text`: completions of text prompts through the generation engine (engine.py).

Used by `lm sample`, the samples in a run's report and the speedrun. On a pod every process
calls it with the same arguments and steps the same engine in lockstep (the params are sharded
across processes); each gets every completion.
"""

from __future__ import annotations

from flax import nnx

from lm.inference.engine import Engine, SamplingParams
from lm.models.transformer import ModelConfig


def generate_text(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    model_cfg: ModelConfig,
    vocab,
    prompts: list[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
) -> list[str]:
    """`num_samples` completions of each prompt, in order; each stops at EOS. A prompt longer
    than the context leaves room for the completion by keeping its last tokens."""
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    max_new_tokens = min(max_new_tokens, model_cfg.max_seq_len - 1)
    room = model_cfg.max_seq_len - max_new_tokens
    count = len(prompts) * num_samples
    engine = Engine(
        graphdef, params, model_cfg, vocab, slots=min(16, 1 << max(count - 1, 0).bit_length())
    )
    ids, params_list = [], []
    for p_index, text in enumerate(prompts):
        prompt = engine.encode_prompt(text)
        if not prompt:
            raise ValueError(f"prompt {p_index} is empty and the vocabulary has no BOS token")
        for s in range(num_samples):
            ids.append(prompt[-room:])
            # One seed per (seed, prompt, sample): reproducible, and the same alone or batched.
            request_seed = (seed * 1_000_003 + p_index * 1009 + s) % (2**31 - 1)
            params_list.append(
                SamplingParams(
                    max_tokens=max_new_tokens,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    seed=request_seed,
                )
            )
    return [r.text for r in engine.generate(ids, params_list)]
