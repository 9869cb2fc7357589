"""Regenerates the offline `lm_python` tasks' data files from this machine's Python stdlib.

`python -m lm.evaluation.make_tasks [--out=DIR]` writes JSONL files (one record a line, each
with a "split": "train" for few-shot examples or "test") into
lm/evaluation/tasks/lm_python/data/. The output is shipped in the repo, so evaluation needs no
download; rerunning on the same Python gives the same bytes (every choice is made by sorting
on a SHA-256 of a stable key, never by a random generator).

- funcname: a function's docstring summary -> its name, multiple choice among 4 names of the
  same module (multiple_choice; acc / acc_norm).
- brackets: a real line cut just before the run of closing brackets that ends it -> emit that
  run (generate_until, stop at newline; exact_match).
- line: a few lines of code and the start of the next -> the rest of that line
  (generate_until; exact_match and a character-level similarity).
- perplexity: whole held-out stdlib files, the validation split the stdlib data source keeps
  out of training (loglikelihood_rolling; word/byte perplexity, bits per byte).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import sysconfig
import tokenize
from collections.abc import Iterator

import ml_collections

DATA_DIR = os.path.join(os.path.dirname(__file__), "tasks", "lm_python", "data")
TEST_DOCS = 200
TRAIN_DOCS = 8  # few-shot examples (--num_fewshot), disjoint from the test docs
PERPLEXITY_MAX_CHARS = 6000
CLOSERS = ")]}"
OPENERS = "([{"


def _rank(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def stdlib_sources() -> list[tuple[str, str]]:
    """(relative path, text) of every stdlib .py file the `stdlib` data source reads, sorted."""
    from lm.data.sources import split_refs

    refs = []
    for split in ("train", "validation"):
        refs += split_refs(_stdlib_config(), split)
    out = []
    for ref in sorted(refs, key=lambda r: r.key):
        text = ref.load()
        if text:
            out.append((ref.key, text))
    return out


def _stdlib_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            source="stdlib",
            include="*.py",
            exclude="",
            max_documents=0,
            max_file_bytes=1_000_000,
            validation_fraction=0.02,  # the config default: these files are held out
        )
    )


def held_out_sources() -> list[tuple[str, str]]:
    """The stdlib .py files of the validation split (never trained on by a stdlib run)."""
    from lm.data.sources import split_refs

    out = []
    for ref in split_refs(_stdlib_config(), "validation"):
        text = ref.load()
        if text and text.strip():
            out.append((ref.key, text))
    return out


def _module_name(rel: str) -> str:
    name = rel[: -len(".py")].replace("/", ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _summary(docstring: str) -> str:
    """A docstring's first paragraph, whitespace-collapsed."""
    return " ".join(docstring.strip().split("\n\n")[0].split())


def _functions(text: str) -> list[tuple[str, str]]:
    """(name, docstring summary) of the module's functions and methods with a usable docstring."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        name, doc = node.name, ast.get_docstring(node)
        if name.startswith("__") or not doc:
            continue
        summary = _summary(doc)
        # The name inside its own description would give the answer away.
        if not 12 <= len(summary) <= 160 or name.lower() in summary.lower():
            continue
        out.append((name, summary))
    return out


def funcname_docs(sources: list[tuple[str, str]]) -> list[dict]:
    """Docstring -> name questions, 4 choices from one module, the answer at a hashed index."""
    candidates = []
    for rel, text in sources:
        found = _functions(text)
        counts: dict[str, int] = {}
        for name, _ in found:
            counts[name] = counts.get(name, 0) + 1
        unique = [(n, s) for n, s in found if counts[n] == 1]
        names = sorted({n for n, _ in unique})
        if len(names) < 4:
            continue
        for name, summary in unique:
            others = sorted(
                (n for n in names if n != name), key=lambda n: _rank(f"{rel}:{name}:{n}")
            )
            choices = sorted([name, *others[:3]], key=lambda n: _rank(f"{rel}:{name}:order:{n}"))
            candidates.append(
                {
                    "module": _module_name(rel),
                    "docstring": summary,
                    "choices": choices,
                    "answer": choices.index(name),
                    "_key": f"{rel}:{name}",
                }
            )
    return _take(candidates)


def _lines_with_tokens(text: str) -> Iterator[tuple[int, str, list[tokenize.TokenInfo]]]:
    """(line index, line, tokens) of each logical line that is one physical line of code."""
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return
    lines = text.splitlines()
    current: list[tokenize.TokenInfo] = []
    skip = (tokenize.INDENT, tokenize.DEDENT, tokenize.NL, tokenize.COMMENT, tokenize.ENCODING)
    for tok in tokens:
        if tok.type == tokenize.NEWLINE:
            if current and current[0].start[0] == current[-1].end[0]:
                row = current[0].start[0] - 1
                yield row, lines[row], current
            current = []
        elif tok.type not in skip:
            current.append(tok)


def _context_lines(lines: list[str], row: int, count: int) -> str:
    """Up to `count` lines before `row` (leading blank lines dropped), newline-terminated."""
    before = lines[max(0, row - count) : row]
    while before and not before[0].strip():
        before = before[1:]
    return "".join(line + "\n" for line in before)


def bracket_docs(sources: list[tuple[str, str]]) -> list[dict]:
    """Lines that end in a run of >= 2 closing brackets: the prefix (with the lines before it)
    is the prompt, the run is the answer."""
    candidates = []
    for rel, text in sources:
        lines = text.splitlines()
        for row, line, toks in _lines_with_tokens(text):
            run = 0
            while run < len(toks) and toks[-1 - run].type == tokenize.OP:
                if toks[-1 - run].string not in CLOSERS:
                    break
                run += 1
            if run < 2 or run == len(toks):
                continue
            first = toks[-run]
            if first.start[1] == 0 or line[first.start[1] - 1].isspace():
                continue
            answer = line[first.start[1] : toks[-1].end[1]]
            if len(answer) != run or line[toks[-1].end[1] :].strip():
                continue  # spaces inside the run, or something after it
            if len(line) > 120:
                continue
            context = _context_lines(lines, row, 4) + line[: first.start[1]]
            candidates.append({"context": context, "answer": answer, "_key": f"{rel}:{row}"})
    return _take(candidates)


def line_docs(sources: list[tuple[str, str]]) -> list[dict]:
    """A line of code cut at a token boundary past its first third: the lines before it and
    its start are the prompt, the rest of the line (with its leading space) the answer."""
    candidates = []
    for rel, text in sources:
        lines = text.splitlines()
        for row, line, toks in _lines_with_tokens(text):
            if not 24 <= len(line) <= 90 or len(toks) < 4:
                continue
            if any(t.type == tokenize.STRING and len(t.string) > 40 for t in toks):
                continue
            cut = next((t.start[1] for t in toks[1:] if t.start[1] >= len(line) // 3), None)
            if cut is None:
                continue
            while cut > 0 and line[cut - 1] == " ":
                cut -= 1  # the prompt ends on code; the answer starts with the space
            answer = line[cut:]
            if len(answer.strip()) < 3 or "\t" in line:
                continue
            context = _context_lines(lines, row, 6) + line[:cut]
            candidates.append({"context": context, "answer": answer, "_key": f"{rel}:{row}"})
    return _take(candidates)


def perplexity_docs(sources: list[tuple[str, str]]) -> list[dict]:
    """Held-out files, each cut at a line end to at most PERPLEXITY_MAX_CHARS characters."""
    docs = []
    for rel, text in sources:
        if len(text) > PERPLEXITY_MAX_CHARS:
            text = text[: text.rfind("\n", 0, PERPLEXITY_MAX_CHARS) + 1]
        if len(text.strip()) >= 200:
            docs.append({"split": "test", "path": rel, "text": text})
    return docs


def _take(candidates: list[dict]) -> list[dict]:
    """TEST_DOCS test and TRAIN_DOCS train docs, chosen by the hash of each doc's key."""
    ordered = sorted(candidates, key=lambda d: _rank(d.pop("_key")))
    picked = ordered[: TEST_DOCS + TRAIN_DOCS]
    for i, doc in enumerate(picked):
        doc["split"] = "train" if i < TRAIN_DOCS else "test"
    return picked


def write_jsonl(path: str, docs: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False, sort_keys=True) + "\n")


def make_all(out_dir: str = DATA_DIR) -> dict[str, int]:
    """Writes every data file; returns {file name: number of docs}."""
    os.makedirs(out_dir, exist_ok=True)
    sources = stdlib_sources()
    made = {
        "funcname.jsonl": funcname_docs(sources),
        "brackets.jsonl": bracket_docs(sources),
        "line.jsonl": line_docs(sources),
        "perplexity.jsonl": perplexity_docs(held_out_sources()),
    }
    for name, docs in made.items():
        write_jsonl(os.path.join(out_dir, name), docs)
    return {name: len(docs) for name, docs in made.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DATA_DIR, help="directory for the JSONL files")
    args = parser.parse_args(argv)
    sizes = make_all(args.out)
    stdlib = sysconfig.get_paths()["stdlib"]
    print(f"from {stdlib}:")
    for name, n in sizes.items():
        path = os.path.join(args.out, name)
        print(f"  {path}: {n} docs, {os.path.getsize(path):,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
