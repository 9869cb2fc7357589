"""lm-eval glue for the safety tasks (lm_crows_pairs, lm_refusal, lm_toxicity; group lm_safety).

The math lives in lm/evaluation/safety.py and lm/evaluation/toxicity.py; this module only turns
files into lm-eval datasets and lm-eval results into those functions' arguments.

Data: each task reads the project-made sample next to this file unless a task option (lm-eval
`--metadata='{"crows_pairs_csv": PATH}'`) or an environment variable names the real file:

    crows_pairs_csv   / LM_CROWS_PAIRS_CSV   crows_pairs_anonymized.csv (nyu-mll/crows-pairs)
    refusal_jsonl     / LM_REFUSAL_JSONL     {"prompt", "label": harmful|benign} per line
    toxicity_jsonl    / LM_TOXICITY_JSONL    RealToxicityPrompts' prompts.jsonl
    toxicity_scorer   / LM_TOXICITY_SCORER   lexicon (default) | detoxify | perspective

The samples are small and synthetic (the toxicity sample's `challenging` marks its provocative
prompts); they exercise the pipeline, they do not measure a model.
"""

from __future__ import annotations

import os

import datasets

from lm.evaluation import safety, toxicity

HERE = os.path.dirname(os.path.abspath(__file__))


def _test_split(rows: list[dict]) -> datasets.DatasetDict:
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def _sample(name: str) -> str:
    return os.path.join(HERE, name)


def keep_all_samples(resps, docs):
    """A filter that keeps every repeat of a request (lm-eval's default keeps the first)."""
    return resps


# -- lm_crows_pairs ---------------------------------------------------------------------------


def load_crows_pairs(**options) -> datasets.DatasetDict:
    path = safety.data_file(
        options, "crows_pairs_csv", "LM_CROWS_PAIRS_CSV", _sample("crows_pairs_sample.csv")
    )
    return _test_split(safety.read_crows_pairs_csv(path))


def crows_pairs_choices(doc: dict) -> list[str]:
    return [doc["sent_more"], doc["sent_less"]]


def crows_pairs_results(doc: dict, results: list[tuple[float, bool]]) -> dict:
    """results: [(loglik, is_greedy) of sent_more, (loglik, is_greedy) of sent_less]."""
    (loglik_more, _), (loglik_less, _) = results
    return safety.crows_pairs_metrics(
        loglik_more, loglik_less, doc["stereo_antistereo"], doc["bias_type"]
    )


mean_stereo = safety.mean_for("stereo")
mean_antistereo = safety.mean_for("antistereo")
mean_race_color = safety.mean_for("race-color")
mean_socioeconomic = safety.mean_for("socioeconomic")
mean_gender = safety.mean_for("gender")
mean_disability = safety.mean_for("disability")
mean_nationality = safety.mean_for("nationality")
mean_sexual_orientation = safety.mean_for("sexual-orientation")
mean_physical_appearance = safety.mean_for("physical-appearance")
mean_religion = safety.mean_for("religion")
mean_age = safety.mean_for("age")


# -- lm_refusal -------------------------------------------------------------------------------


def load_refusal(**options) -> datasets.DatasetDict:
    """Prompts with the chat text the model sees (the chat template when the tokenizer named by
    the options, `workdir` or `tokenizer`, has the role tokens; else `User: ...\\nAssistant:`)."""
    path = safety.data_file(
        options, "refusal_jsonl", "LM_REFUSAL_JSONL", _sample("refusal_prompts.jsonl")
    )
    vocab = safety.load_vocab_from_options(options)
    rows = safety.read_refusal_jsonl(path)
    for row in rows:
        row["chat_text"] = safety.chat_prompt_text(row["prompt"], vocab)
    return _test_split(rows)


def refusal_results(doc: dict, results: list[str]) -> dict:
    return safety.refusal_metrics(doc["label"], results[0])


mean_harmful = safety.mean_for("harmful")
mean_benign = safety.mean_for("benign")


# -- lm_toxicity ------------------------------------------------------------------------------


def load_toxicity(**options) -> datasets.DatasetDict:
    """Prompts, each tagged with the scorer's name; the scorer is built here, before any
    generation, so a missing package or API key fails the run at once."""
    path = safety.data_file(
        options, "toxicity_jsonl", "LM_TOXICITY_JSONL", _sample("toxicity_prompts.jsonl")
    )
    scorer = toxicity.get_scorer(options.get("toxicity_scorer"))
    rows = toxicity.read_toxicity_prompts(path)
    for row in rows:
        row["scorer"] = scorer.name
    return _test_split(rows)


def toxicity_results(doc: dict, results: list[list[str]]) -> dict:
    """results: [the prompt's sampled continuations] (all repeats, see keep_all_samples)."""
    samples = results[0] if isinstance(results[0], list) else results
    scores = toxicity.get_scorer(doc["scorer"]).score(list(samples))
    return toxicity.prompt_toxicity_metrics(scores)
