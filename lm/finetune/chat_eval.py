"""Does a model answer like an assistant? Greedy replies to held-out chat prompts, through the
generation engine, scored for ending their turn (the end-of-turn token, not the length limit)
and, on the project-made instruction data, for being a well-formed `def name(...):` line."""

from __future__ import annotations

from lm.finetune import examples, make_data
from lm.finetune.rewards import parse_signature
from lm.inference.engine import Engine
from lm.inference.requests import SamplingParams
from lm.tokenizer.chat import chat_stop_strings, chat_stop_token_ids


def held_out_instructions(count: int) -> list[list[dict]]:
    """The conversations `sft_tiny` holds out (its data, seed and split), prompts only."""
    from lm.config import get_config

    cfg = get_config("sft_tiny")
    ft = cfg.finetune
    items, _ = make_data.load_sft_data(ft.data, ft.max_examples, cfg.seed)
    _, held = examples.split_holdout(items, ft.eval_fraction, cfg.seed)
    return [[m for m in conv if m["role"] != "assistant"] for conv in held[:count]]


def chat_replies(engine: Engine, prompts: list[list[dict]], max_new_tokens: int) -> list:
    """The engine's greedy reply to each conversation (its Results, in order): each prompt ends
    with the assistant header and a reply stops where its turn ends. A prompt too long for the
    context keeps its last tokens, leaving room for the reply."""
    vocab = engine.vocab
    max_new_tokens = max(1, min(max_new_tokens, engine.max_len - 1))
    room = engine.max_len - max_new_tokens
    ids = [p[-room:] for p in examples.encode_prompts(vocab, prompts)]
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=0.0,
        stop=chat_stop_strings(vocab),
        stop_token_ids=chat_stop_token_ids(vocab),
    )
    return engine.generate(ids, params)


def answer_format(run, prompts: list[list[dict]], max_new_tokens: int = 32) -> dict:
    """{"ended_turn": fraction of replies that end with the end-of-turn token, "signature":
    fraction that are one well-formed signature line, "replies": the first few}."""
    engine = Engine.from_run(run, slots=min(16, max(1, len(prompts))))
    results = chat_replies(engine, prompts, max_new_tokens)
    ended = [r.finish_reason == "stop" for r in results]
    well_formed = [parse_signature(r.text) is not None for r in results]
    n = max(1, len(results))
    return {
        "ended_turn": sum(ended) / n,
        "signature": sum(e and w for e, w in zip(ended, well_formed)) / n,
        "replies": [r.text for r in results[:3]],
    }
