"""Loaders and scorers of the offline `lm_python` tasks (lm-eval's `!function utils.NAME`).

The data files beside this module (data/*.jsonl, made by `python -m lm.evaluation.make_tasks`)
hold every doc with a "split" field; each loader returns {split: datasets.Dataset}, which
lm-eval's `custom_dataset` takes in place of a Hugging Face download. lm-eval passes the task
manager's metadata as keyword arguments; they are not needed here.
"""

from __future__ import annotations

import difflib
import json
import os

import datasets

DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


def _load(name: str) -> dict[str, datasets.Dataset]:
    path = os.path.join(DATA_DIR, name)
    by_split: dict[str, list[dict]] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            doc = json.loads(line)
            by_split.setdefault(doc.pop("split"), []).append(doc)
    return {split: datasets.Dataset.from_list(docs) for split, docs in by_split.items()}


def load_funcname(**metadata) -> dict[str, datasets.Dataset]:
    return _load("funcname.jsonl")


def load_brackets(**metadata) -> dict[str, datasets.Dataset]:
    return _load("brackets.jsonl")


def load_line(**metadata) -> dict[str, datasets.Dataset]:
    return _load("line.jsonl")


def load_perplexity(**metadata) -> dict[str, datasets.Dataset]:
    return _load("perplexity.jsonl")


def line_results(doc: dict, results: list[str]) -> dict[str, float]:
    """The line task's own scorer: exact match of the rest of the line, and how much of it
    was right (difflib's similarity ratio of the two strings, 0..1)."""
    prediction, answer = results[0], doc["answer"]
    return {
        "exact_match": float(prediction == answer),
        "edit_similarity": difflib.SequenceMatcher(None, prediction, answer).ratio(),
    }
