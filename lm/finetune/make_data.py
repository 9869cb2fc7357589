"""Project-made fine-tuning data from the embedded corpus (the Python standard library that the
pretraining `stdlib` source reads), so every `lm finetune` method runs offline, checkably.

Each example comes from one documented function of a stdlib module (a top-level `def`, or a
method of a top-level class with its `self` / `cls` dropped), found with `ast`:

    user:      Write the signature of a Python function that does this: <first docstring
               sentence, lowercased start>
    assistant: def name(arg, other=None):

The answer is rigid (one line, no annotations, defaults as written) so that a reward can check
it (lm/finetune/rewards.py) and a tiny model can learn its format. Three kinds:

- `instructions`: the conversations above, for SFT.
- `preferences`: the same prompts; chosen = the right signature followed by a comment saying
  what the function gives back (`  # returns a value`, `  # returns None` or `  # yields
  values`, read from its body), rejected = the plain signature SFT teaches. Why this choice:
  the preference must be one that SFT on `instructions` does NOT already decide, or DPO would
  have nothing to add. A corrupted signature (wrong name, missing argument) is already unlikely
  after SFT, so the SFT model would win most pairs on its own. The SFT data never has the
  comment, so the SFT model prefers the rejected (plain) answer on nearly every pair, held-out
  ones included: held-out preference accuracy starts near 0 and rises only if DPO teaches the
  style, which generalizes to unseen prompts (the comment's words follow the docstring's verb).
- `verifiable`: the same prompts with the function's name as `answer`, for GRPO / PPO with the
  `signature` reward (1 for a well-formed line, +1 for the right name).

Deterministic: files are visited in a seeded order and parsing stops once enough examples are
found, so a few thousand take a couple of seconds and a smaller request is a prefix of a larger.

    python -m lm.finetune.make_data --kind=instructions --out=FILE.jsonl [--max_examples=N]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass

import numpy as np

from lm import storage
from lm.errors import ConfigError, LMError
from lm.finetune.formats import (
    PreferencePair,
    PromptItem,
    read_conversations,
    read_preferences,
    read_prompts,
)

KINDS = ("instructions", "preferences", "verifiable")
PROMPT_PREFIX = "Write the signature of a Python function that does this: "
MAX_SIGNATURE_CHARS = 50  # at most about 25 tokens of the tiny 2048-piece BPE tokenizer
MAX_DEFAULT_CHARS = 16
SENTENCE_CHARS = (12, 100)
RETURNS_COMMENT = {"value": "returns a value", "none": "returns None", "generator": "yields values"}
_SENTENCE = re.compile(r"^(.+?\.)(\s|$)")


@dataclass(frozen=True)
class Example:
    """One documented function: the request, its signature line, its name and what it returns
    ("value" | "none" | "generator", or None for a stub whose body only raises / passes)."""

    prompt: str
    signature: str
    name: str
    returns: str | None


# -- from a function definition to an example -----------------------------------------------


def _sentence(docstring: str) -> str | None:
    """The docstring's first sentence with a lowercased start, or None if unusable."""
    paragraph = " ".join(docstring.strip().split("\n\n")[0].split())
    match = _SENTENCE.match(paragraph)
    if not match:
        return None
    sentence = match.group(1)
    low, high = SENTENCE_CHARS
    if not (low <= len(sentence) <= high and sentence.isascii() and sentence[0].isalpha()):
        return None
    if ">>>" in sentence or "<|" in sentence:
        return None
    if len(sentence) > 1 and sentence[1].isupper():  # an acronym ("URL ..."): keep its case
        return sentence
    return sentence[0].lower() + sentence[1:]


def _default(node: ast.expr) -> str | None:
    text = ast.unparse(node)
    return text if len(text) <= MAX_DEFAULT_CHARS and "\n" not in text else None


def _parameters(args: ast.arguments, drop_first: bool) -> list[str] | None:
    """The parameter list as written, without annotations; None if a default is too long (or a
    method has no `self` to drop)."""
    names = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(names) - len(args.defaults)) + list(args.defaults)
    positional = [
        (a, d, i < len(args.posonlyargs)) for i, (a, d) in enumerate(zip(names, defaults))
    ]
    if drop_first:
        if not positional:
            return None
        positional = positional[1:]
    keyword = list(zip(args.kwonlyargs, args.kw_defaults))
    out = []
    for arg, default in [(a, d) for a, d, _ in positional] + keyword:
        value = None if default is None else _default(default)
        if default is not None and value is None:
            return None
        out.append(arg.arg if value is None else f"{arg.arg}={value}")
    posonly = sum(p for _, _, p in positional)
    if posonly:
        out.insert(posonly, "/")
    star = len(positional) + int(posonly > 0)
    if args.vararg:
        out.insert(star, f"*{args.vararg.arg}")
    elif args.kwonlyargs:
        out.insert(star, "*")
    if args.kwarg:
        out.append(f"**{args.kwarg.arg}")
    return out


_BLOCKS = ("body", "orelse", "finalbody", "handlers", "cases")
_YIELDS = (ast.Yield, ast.YieldFrom)


def _statements(body: list[ast.stmt]):
    """The statements of a function body, nested blocks included, not descending into nested
    functions or classes (statements only: walking every expression costs seconds)."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        yield stmt
        for field in _BLOCKS:
            yield from _statements(getattr(stmt, field, None) or [])


def _is_constant(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)


def _returns(func: ast.FunctionDef) -> str | None:
    """What the body gives back: "generator" (a yield statement), "value" (a `return x` with x
    not None) or "none"; None for a stub (after the docstring only raise / pass / constants)."""
    body = func.body[1:]
    if all(isinstance(s, ast.Raise | ast.Pass) or _is_constant(s) for s in body):
        return None
    statements = list(_statements(body))
    if any(isinstance(getattr(s, "value", None), _YIELDS) for s in statements):
        return "generator"
    for s in statements:
        if isinstance(s, ast.Return) and s.value is not None:
            if not (isinstance(s.value, ast.Constant) and s.value.value is None):
                return "value"
    return "none"


def _example(func: ast.FunctionDef, method: bool) -> Example | None:
    if func.name.startswith("__"):
        return None
    decorators = {ast.unparse(d).split(".")[-1] for d in func.decorator_list}
    if decorators & {"property", "setter", "getter", "deleter", "overload"}:
        return None
    docstring = ast.get_docstring(func)
    sentence = _sentence(docstring) if docstring else None
    if sentence is None or sentence.lower().startswith(func.name.lower() + "("):
        return None
    params = _parameters(func.args, drop_first=method and "staticmethod" not in decorators)
    if params is None:
        return None
    signature = f"def {func.name}({', '.join(params)}):"
    if len(signature) > MAX_SIGNATURE_CHARS:
        return None
    return Example(PROMPT_PREFIX + sentence, signature, func.name, _returns(func))


def examples_of_module(source: str) -> list[Example]:
    """The usable documented functions and methods of one module's source, in file order."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            out.append(_example(node, method=False))
        elif isinstance(node, ast.ClassDef):
            out.extend(_example(m, True) for m in node.body if isinstance(m, ast.FunctionDef))
    return [e for e in out if e is not None]


# -- the corpus ------------------------------------------------------------------------------


def _module_sources(seed: int):
    """The stdlib's .py files as the pretraining `stdlib` source lists them (both splits), in a
    seeded order; yields each file's text."""
    from lm.config import default_config
    from lm.data.sources import SPLITS, split_refs

    data = default_config().data
    data.source, data.include, data.max_documents = "stdlib", "*.py", 0
    refs = sorted((r for split in SPLITS for r in split_refs(data, split)), key=lambda r: r.key)
    for i in np.random.default_rng(seed).permutation(len(refs)):
        text = refs[i].load()
        if text:
            yield text


def stdlib_examples(max_examples: int, seed: int, keep=lambda e: True) -> list[Example]:
    """Up to `max_examples` (0: all) distinct-prompt examples that pass `keep`."""
    out, seen = [], set()
    for source in _module_sources(seed):
        for example in examples_of_module(source):
            if example.prompt in seen:
                continue
            seen.add(example.prompt)  # before `keep`: a filtered list is a subsequence of all
            if not keep(example):
                continue
            out.append(example)
            if len(out) == max_examples:
                return out
    return out


def _user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def instructions(max_examples: int, seed: int) -> list[list[dict]]:
    """SFT conversations: [user: the request, assistant: `def name(...):`]."""
    return [
        [*_user(e.prompt), {"role": "assistant", "content": e.signature}]
        for e in stdlib_examples(max_examples, seed)
    ]


def chosen_answer(example: Example) -> str:
    """The preferred answer: the signature and a comment on what the function gives back."""
    return f"{example.signature}  # {RETURNS_COMMENT[example.returns]}"


def preferences(max_examples: int, seed: int) -> list[PreferencePair]:
    """DPO pairs: chosen = signature + return comment, rejected = the plain signature (the
    module docstring says why). Stubs, whose body says nothing of what they return, are
    skipped."""
    found = stdlib_examples(max_examples, seed, keep=lambda e: e.returns is not None)
    return [PreferencePair(_user(e.prompt), chosen_answer(e), e.signature) for e in found]


def verifiable(max_examples: int, seed: int) -> list[PromptItem]:
    """RL prompts with the function's name as the answer (the `signature` reward)."""
    return [PromptItem(_user(e.prompt), e.name) for e in stdlib_examples(max_examples, seed)]


# -- what the trainer calls ------------------------------------------------------------------

_MAKERS = {"instructions": instructions, "preferences": preferences, "verifiable": verifiable}


def _load(spec: str, kind: str, reader, max_examples: int, seed: int) -> tuple[list, Counter]:
    """`stdlib:<kind>` or a JSONL spec -> (up to max_examples items, reject counts)."""
    if not spec:
        raise ConfigError(f"set --config.finetune.data=stdlib:{kind} or a .jsonl path")
    if spec.startswith("stdlib:"):
        name = spec.split(":", 1)[1]
        if name != kind:
            hint = f"stdlib:{name} is not one of {', '.join(KINDS)}"
            if name in KINDS:
                hint = f"stdlib:{name} is {name} data"
            raise ConfigError(f"{hint}; this method reads stdlib:{kind} or a .jsonl path")
        return _MAKERS[kind](max_examples, seed), Counter()
    items, rejects = reader(spec)
    return (items[:max_examples] if max_examples else items), rejects


def load_sft_data(spec: str, max_examples: int = 0, seed: int = 0) -> tuple[list, Counter]:
    """Conversations of `stdlib:instructions` or a JSONL spec: (items, reject counts)."""
    return _load(spec, "instructions", read_conversations, max_examples, seed)


def load_preference_data(spec: str, max_examples: int = 0, seed: int = 0) -> tuple[list, Counter]:
    """PreferencePairs of `stdlib:preferences` or a JSONL spec: (items, reject counts)."""
    return _load(spec, "preferences", read_preferences, max_examples, seed)


def load_prompt_data(spec: str, max_examples: int = 0, seed: int = 0) -> tuple[list, Counter]:
    """PromptItems of `stdlib:verifiable` or a JSONL spec: (items, reject counts)."""
    return _load(spec, "verifiable", read_prompts, max_examples, seed)


# -- the command line ------------------------------------------------------------------------


def _prompt_field(messages: list[dict]):
    """A single user turn as its text; anything longer as the message list."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return messages


def to_records(kind: str, items: list) -> list[dict]:
    """Items of `kind` as the standard JSONL records lm/finetune/formats.py reads."""
    if kind == "instructions":
        return [{"messages": m} for m in items]
    if kind == "preferences":
        return [
            {"prompt": _prompt_field(p.prompt), "chosen": p.chosen, "rejected": p.rejected}
            for p in items
        ]
    return [{"prompt": _prompt_field(p.prompt), "answer": p.answer} for p in items]


def main(argv: list[str] | None = None) -> int:
    """Writes one kind of project-made data as JSONL; exit 2 with one line on a user error."""
    parser = argparse.ArgumentParser(prog="python -m lm.finetune.make_data")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--out", required=True, help="a .jsonl path (local or gs://)")
    parser.add_argument("--max_examples", type=int, default=0, help="0: all")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        items = _MAKERS[args.kind](args.max_examples, args.seed)
        lines = [json.dumps(r, ensure_ascii=False) for r in to_records(args.kind, items)]
        storage.write_text(args.out, "".join(line + "\n" for line in lines))
    except LMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(lines)} {args.kind} examples -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
