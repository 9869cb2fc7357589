"""lm-eval's `local-completions` model against `lm serve` gives the scores `lm eval` computes
in-process: the same acc on the offline multiple-choice task, the same per-choice
loglikelihoods (to 1e-4; the server's prefill differs from the scorer's batched forward only
in float rounding).

lm-eval sends text prompts (`tokenized_requests=False`) and counts context tokens with the
server's own tokenizer (`tokenizer_backend=remote`): the server runs a text prompt as
[start id] + its tokens and leaves the start token out of the echo, so the continuation's
logprobs are conditioned exactly as `lm eval` conditions them (context = start id + tokens).
"""

from __future__ import annotations

import pytest
import requests
from lm_eval import simple_evaluate

from lm.evaluation.cli import run_eval, task_manager
from lm.evaluation.harness import LMEvalModel
from lm.inference.engine import Engine
from lm.serve.app import create_app
from lm.serve.runner import ServerThread
from lm.training.restore import restore_run

TASK = "lm_py_funcname"
DOCS = 5  # the first docs' prompts fit the tiny model's 128-token context (checked below)


@pytest.fixture(scope="module")
def run(tiny_workdir):
    return restore_run(tiny_workdir)


@pytest.fixture(scope="module")
def engine(run):
    return Engine(
        run.trainer.graphdef, run.params, run.model_cfg, run.vocab, slots=8, rules=run.trainer.rules
    )


@pytest.fixture(scope="module")
def server_url(engine):
    with ServerThread(create_app(engine, model_name="tiny", api_key="")) as url:
        yield url


@pytest.fixture(autouse=True)
def _local_http(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def echo_logprobs(url: str, prompt) -> list:
    body = {"model": "tiny", "prompt": prompt, "echo": True, "logprobs": 1, "max_tokens": 1}
    response = requests.post(f"{url}/v1/completions", json={**body, "temperature": 0}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


def test_server_echo_conventions_lm_eval_relies_on(server_url, run):
    text = "the model loss falls"
    ids = run.vocab.encode(text)
    tokenized = requests.post(
        f"{server_url}/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60
    ).json()["tokens"]
    assert tokenized == ids
    from_text = echo_logprobs(server_url, text)
    assert len(from_text) == len(ids) + 1 and from_text[0] is not None
    start = getattr(run.vocab, "start_id", run.vocab.bos_id)
    from_ids = echo_logprobs(server_url, [start, *ids])
    assert len(from_ids) == len(ids) + 2 and from_ids[0] is None
    assert from_ids[1:] == pytest.approx(from_text, abs=1e-4)


def per_doc_loglikelihoods(samples: list[dict]) -> dict[int, list[float]]:
    return {s["doc_id"]: [r[0] for r in s["filtered_resps"]] for s in samples}


def test_local_completions_matches_lm_eval_in_process(server_url, engine, run):
    vocab = run.vocab
    lm = LMEvalModel.from_engine(engine, batch_size=8)  # scores with the served params
    local = run_eval(lm, TASK, limit=DOCS, log_samples=True)
    for sample in local["samples"][TASK]:
        for context, continuation in sample["arguments"]:
            # start id + prompt + 1 generated token must fit the server's context
            assert len(vocab.encode(context + continuation)) + 2 <= run.model_cfg.max_seq_len
    start = getattr(vocab, "start_id", vocab.bos_id)
    served = simple_evaluate(
        model="local-completions",
        model_args={
            "base_url": f"{server_url}/v1/completions",
            "model": "tiny",
            "tokenizer_backend": "remote",
            "tokenized_requests": False,
            "max_length": run.model_cfg.max_seq_len,
            "custom_prefix_token_id": start,
            "max_retries": 1,
        },
        tasks=[TASK],
        limit=DOCS,
        task_manager=task_manager([TASK]),
        log_samples=True,
        bootstrap_iters=0,
    )
    got = served["results"][TASK]
    want = local["results"][TASK]
    assert got["acc,none"] == pytest.approx(want["acc,none"])
    assert got["acc_norm,none"] == pytest.approx(want["acc_norm,none"])
    remote = per_doc_loglikelihoods(served["samples"][TASK])
    in_process = per_doc_loglikelihoods(local["samples"][TASK])
    assert sorted(remote) == sorted(in_process) == list(range(DOCS))
    for doc_id, lls in in_process.items():
        assert remote[doc_id] == pytest.approx(lls, abs=1e-4), doc_id
