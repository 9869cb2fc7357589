"""Fine-tuning examples as the trainer's numpy batch arrays: packed SFT rows, preference rows,
generation prompts, and a held-out split.

Every row has the features of a pretraining row (lm/data/pipeline.py), each [rows, seq_len]:
`inputs`, `targets`, `segment_ids` (1, 2, ... per example, 0 = padding), `positions` (0, 1, ...
restarting per segment) int32, and `weights` float32 (1.0 where the target is learned). Every
example is tokenized with the chat template `lm serve` uses (lm/tokenizer/chat.py), so a model
is fine-tuned on exactly the ids it will be prompted with.

Why the mask travels with each example through packing: the loss must count only assistant
tokens (and their end-of-turn token). Each example keeps its own ids, shifted mask and positions
at its offset in the row, and every target lies inside its own segment, so packing changes
neither what is learned nor what the model can attend to.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from lm.errors import ConfigError, DataError
from lm.finetune.formats import PreferencePair, PromptItem
from lm.tokenizer.chat import apply_chat_template, start_token_id

ROW_FEATURES = ("inputs", "targets", "weights", "segment_ids", "positions")
PAIR_SIDES = ("chosen", "rejected")


def _empty_rows(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    """Zeroed rows [rows, seq_len]: padding everywhere (segment 0, weight 0)."""
    return {
        k: np.zeros((rows, seq_len), np.float32 if k == "weights" else np.int32)
        for k in ROW_FEATURES
    }


def _place(rows: dict, row: int, offset: int, segment: int, ids, mask) -> None:
    """Writes one example's next-token view at `offset` of `row`: inputs ids[:-1], targets
    ids[1:], weight[t] = mask[t + 1] (the target's own mask)."""
    n = len(ids) - 1
    span = slice(offset, offset + n)
    rows["inputs"][row, span] = ids[:-1]
    rows["targets"][row, span] = ids[1:]
    rows["weights"][row, span] = mask[1:]
    rows["segment_ids"][row, span] = segment
    rows["positions"][row, span] = np.arange(n)


def encode_conversation(vocab, messages: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n], mask int32 [n]) of a whole conversation: mask 1 on assistant content
    tokens and their end-of-turn token, 0 on the start token, role tokens and other turns."""
    ids, mask = apply_chat_template(
        vocab, messages, add_generation_prompt=False, return_assistant_mask=True
    )
    return np.asarray(ids, np.int32), np.asarray(mask, np.int32)


def pack_conversations(
    vocab, conversations: Sequence[list[dict]], seq_len: int
) -> tuple[dict[str, np.ndarray], Counter]:
    """Packs conversations greedily (first fit, in order) into next-token rows.

    A conversation of n tokens fills n - 1 positions. One over seq_len + 1 tokens is cut at the
    end ("truncated"), or dropped ("too_long") when no assistant target survives the cut; one
    with no assistant target at all is dropped ("no_assistant"). Returns ({feature: [rows,
    seq_len]}, counts)."""
    counts: Counter = Counter()
    examples = []
    for messages in conversations:
        ids, mask = encode_conversation(vocab, messages)
        if len(ids) > seq_len + 1:
            ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
            if not mask[1:].any():
                counts["too_long"] += 1
                continue
            counts["truncated"] += 1
        if len(ids) < 2 or not mask[1:].any():
            counts["no_assistant"] += 1
            continue
        examples.append((ids, mask))
    if conversations and not examples:
        raise DataError(
            f"no conversation fits seq_len={seq_len} with an assistant token left ({dict(counts)})"
            ": raise the sequence length or shorten the examples"
        )
    # First fit: each example goes to the first row with room, else opens a new row.
    room = np.full(len(examples), seq_len, np.int64)
    placed = []  # (row, offset, segment)
    segments = np.zeros(len(examples), np.int64)
    used = 0
    for ids, _mask in examples:
        n = len(ids) - 1
        fits = np.flatnonzero(room[:used] >= n)
        row = int(fits[0]) if fits.size else used
        used += int(not fits.size)
        segments[row] += 1
        placed.append((row, seq_len - int(room[row]), int(segments[row])))
        room[row] -= n
    rows = _empty_rows(used, seq_len)
    for (ids, mask), (row, offset, segment) in zip(examples, placed):
        _place(rows, row, offset, segment, ids, mask)
    return rows, counts


def _prompt_and_completion(vocab, prompt: list[dict], completion: str) -> tuple[list, list]:
    """(prompt ids ending with the assistant header, completion ids with their end token): the
    tail of the templated conversation prompt + [assistant: completion], so the completion is
    exactly what SFT learns and `lm serve` generates (plain-text fallback included)."""
    prompt_ids = apply_chat_template(vocab, prompt, add_generation_prompt=True)
    full, mask = apply_chat_template(
        vocab,
        [*prompt, {"role": "assistant", "content": completion}],
        add_generation_prompt=False,
        return_assistant_mask=True,
    )
    assert full[: len(prompt_ids)] == prompt_ids and all(mask[len(prompt_ids) :])
    return prompt_ids, full[len(prompt_ids) :]


def _cut_prompt(prompt_ids: list[int], keep: int, start: int | None) -> list[int]:
    """The prompt's last `keep` tokens, after its start token when it has one."""
    head = prompt_ids[:1] if start is not None and prompt_ids[:1] == [start] else []
    return head + prompt_ids[len(prompt_ids) - keep :]


def encode_pairs(
    vocab, pairs: Sequence[PreferencePair], seq_len: int
) -> tuple[dict[str, np.ndarray], Counter]:
    """One unpacked, right-padded row per completion: `chosen_<feature>` and
    `rejected_<feature>` for inputs, targets, weights, positions and segment_ids, each
    [n_pairs, seq_len]; weights 1.0 exactly where the target is a completion token or its end.

    Both sides keep the same prompt. Too long: the prompt loses tokens from the left (after its
    start token; "truncated"), or the pair is dropped when a completion alone does not fit
    ("too_long")."""
    counts: Counter = Counter()
    start = start_token_id(vocab)
    kept = []
    for pair in pairs:
        prompt, chosen = _prompt_and_completion(vocab, pair.prompt, pair.chosen)
        _, rejected = _prompt_and_completion(vocab, pair.prompt, pair.rejected)
        head = 1 if start is not None and prompt[:1] == [start] else 0
        keep = seq_len + 1 - max(len(chosen), len(rejected)) - head  # prompt tokens after head
        if keep < 1:
            counts["too_long"] += 1
            continue
        if keep < len(prompt) - head:
            prompt = _cut_prompt(prompt, keep, start)
            counts["truncated"] += 1
        kept.append((prompt, chosen, rejected))
    if pairs and not kept:
        raise DataError(
            f"no preference pair fits seq_len={seq_len} ({dict(counts)}): raise the sequence "
            "length or shorten the completions"
        )
    out = {}
    for side_index, side in enumerate(PAIR_SIDES):
        rows = _empty_rows(len(kept), seq_len)
        for row, (prompt, *completions) in enumerate(kept):
            completion = completions[side_index]
            ids = np.asarray(prompt + completion, np.int32)
            mask = np.asarray([0] * len(prompt) + [1] * len(completion), np.int32)
            _place(rows, row, 0, 1, ids, mask)
        out.update({f"{side}_{k}": v for k, v in rows.items()})
    return out, counts


def encode_prompts(vocab, items: Sequence[PromptItem | PreferencePair | list]) -> list[list[int]]:
    """Generation-prompt ids (ending with the assistant header) of each item's prompt; an item
    is a PromptItem, a PreferencePair or a message list."""
    return [
        apply_chat_template(vocab, getattr(item, "prompt", item), add_generation_prompt=True)
        for item in items
    ]


def split_holdout(items: Sequence, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held_out): a seeded random `fraction` of the items held out (at least one, and
    never all, when fraction > 0 and there are two or more), each part in the original order."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"finetune.eval_fraction must be in [0, 1), got {fraction}")
    n = len(items)
    held = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    out = np.zeros(n, bool)
    out[order[:held]] = True
    return [x for x, o in zip(items, out) if not o], [x for x, o in zip(items, out) if o]
