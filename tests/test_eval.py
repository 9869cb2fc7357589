"""`lm eval`: the lm-eval model's scores against plain forward passes, lm-eval's metrics against
sums done here, generation limits, the offline tasks end to end through the CLI."""

from __future__ import annotations

import functools
import json
import math
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from lm_eval.api.instance import Instance

from lm.cli import main as lm_main
from lm.evaluation import make_tasks, report
from lm.evaluation.cli import run_eval
from lm.evaluation.harness import LMEvalModel
from lm.evaluation.scoring import score_continuations
from lm.training.restore import restore_run

TEXT = "the model loss falls when data is packed and shuffled"


@pytest.fixture(scope="module")
def run(tiny_workdir):
    return restore_run(tiny_workdir)


@pytest.fixture(scope="module")
def lm(run):
    return LMEvalModel.from_run(run, batch_size=4, slots=4)


@pytest.fixture(scope="module")
def host_model(run):
    """The same model on one device: plain unbatched, unpadded forwards for references
    (jitted only because eager op-by-op dispatch compiles every op for every new length)."""
    graphdef = run.trainer.graphdef
    params = jax.device_put(jax.device_get(run.params), jax.devices()[0])

    @jax.jit
    def log_softmax(params, tokens):  # [1, n] -> [n, vocab]
        n = tokens.shape[1]
        positions = jnp.arange(n, dtype=jnp.int32)[None]
        logits, _ = nnx.merge(graphdef, params)(tokens, positions, jnp.ones((1, n), jnp.int32))
        return jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)

    return functools.partial(log_softmax, params)


def token_logprobs(model, ids: list[int]) -> np.ndarray:
    """[len(ids) - 1, vocab] log-softmax of one unpadded forward over `ids` (<= max_len)."""
    return np.asarray(model(jnp.asarray([ids[:-1]], jnp.int32)))


def reference_score(model, context: list[int], continuation: list[int], max_len: int):
    """Sum of the continuation's logprobs and whether each was the argmax, by hand."""
    whole = (context + continuation)[-(max_len + 1) :]
    logp = token_logprobs(model, whole)
    positions = range(len(whole) - 1 - len(continuation), len(whole) - 1)
    total = sum(float(logp[p, whole[p + 1]]) for p in positions)
    greedy = all(int(np.argmax(logp[p])) == whole[p + 1] for p in positions)
    return total, greedy


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


def test_loglikelihood_matches_a_plain_forward(lm, run, host_model):
    vocab, start, max_len = run.vocab, lm.start_id, run.model_cfg.max_seq_len
    long_context = " ".join([TEXT] * 40)  # far past the 128-token context: cut on the left
    pairs = [
        ("the model", " loss falls"),
        ("data is packed ", "and shuffled"),  # the trailing space moves to the continuation
        ("", "the model loss"),  # empty context: the start id alone
        (long_context, " the model"),
    ]
    got = lm.loglikelihood([request("loglikelihood", c, t) for c, t in pairs])
    for (context, continuation), (total, greedy) in zip(pairs, got, strict=True):
        # lm-eval's split, by hand: trailing spaces join the continuation; the pair is encoded
        # whole and cut after the context's tokens; every context starts with the start id.
        stripped = context.rstrip(" ")
        moved = context[len(stripped) :] + continuation
        context_ids = vocab.encode(stripped)
        continuation_ids = vocab.encode(stripped + moved)[len(context_ids) :]
        want = reference_score(host_model, [start, *context_ids], continuation_ids, max_len)
        assert total == pytest.approx(want[0], abs=1e-4), (context[:20], continuation)
        assert greedy == want[1]
    assert got[3][0] < 0 and len(vocab.encode(long_context)) > max_len


def test_is_greedy_batching_and_devices(run, host_model):
    """is_greedy against a hand-picked argmax continuation; a batch of mixed lengths, with
    params sharded over 8 devices, equals one request at a time and the single-device
    reference."""
    vocab, max_len = run.vocab, run.model_cfg.max_seq_len
    context = [vocab.bos_id] + vocab.encode(TEXT)
    logp = token_logprobs(host_model, context + [0])
    best = int(np.argmax(logp[-1]))
    worst = int(np.argmin(logp[-1]))
    requests = [
        (context, [best]),
        (context, [worst]),
        ([vocab.bos_id], vocab.encode("the model loss falls when")),
        (context * 8, vocab.encode(" packed and shuffled")),  # over max_len: cut on the left
    ]
    graphdef, mesh, rules = run.trainer.graphdef, run.trainer.mesh, run.trainer.rules
    assert len(jax.devices()) == 8 and mesh.shape["data"] == 8
    assert len(jax.tree.leaves(run.params)[0].sharding.device_set) == 8
    batched = score_continuations(
        graphdef, run.params, requests, max_len, batch_size=4, mesh=mesh, rules=rules
    )
    assert batched[0] == (pytest.approx(float(logp[-1, best]), abs=1e-4), True)
    assert batched[1][1] is False
    for req, got in zip(requests, batched, strict=True):
        alone = score_continuations(
            graphdef, run.params, [req], max_len, batch_size=1, mesh=mesh, rules=rules
        )
        assert alone[0][0] == pytest.approx(got[0], abs=1e-5) and alone[0][1] == got[1]
        want = reference_score(host_model, *req, max_len)
        assert got[0] == pytest.approx(want[0], abs=1e-4) and got[1] == want[1]


def reference_rolling(model, ids: list[int], start: int, max_len: int) -> float:
    """Each token's logprob given the most context a max_len window allows, predicted once:
    blocks of max_len tokens, the last block's window ending at the document's end."""
    full = [start] + ids
    total, predicted = 0.0, 1  # full[1:] are predicted
    while predicted < len(full):
        end = min(predicted + max_len, len(full))  # predict full[predicted:end]
        first = max(0, end - 1 - max_len)
        logp = token_logprobs(model, full[first:end])
        for j in range(predicted, end):
            total += float(logp[j - 1 - first, full[j]])
        predicted = end
    return total


@pytest.fixture(scope="module")
def tiny_tasks(tmp_path_factory):
    """A hand-built multiple-choice task (choices of very different lengths, so acc and
    acc_norm can disagree) and a one-document rolling perplexity task, in lm-eval's format."""
    root = tmp_path_factory.mktemp("tiny_tasks")
    mc = [
        {"q": "the model", "choices": ["loss", "loss falls when data is packed"], "gold": 1},
        {"q": "data is", "choices": ["packed and shuffled", "the"], "gold": 0},
        {"q": "when", "choices": ["data", "is packed", "the model loss falls"], "gold": 2},
        {"q": "shuffled", "choices": ["and", "falls when the model"], "gold": 0},
        {"q": "loss", "choices": ["falls", "is shuffled and packed when"], "gold": 1},
    ]
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in mc))
    long_doc = " ".join([TEXT, "and the loss is packed"] * 30)
    (root / "doc.jsonl").write_text(json.dumps({"text": long_doc}) + "\n")
    (root / "tiny_utils.py").write_text(
        textwrap.dedent(
            """
            import json, os
            import datasets

            def _read(name, **metadata):
                path = os.path.join(os.path.dirname(__file__), name)
                rows = [json.loads(line) for line in open(path)]
                return {"test": datasets.Dataset.from_list(rows)}

            def load_mc(**metadata):
                return _read("mc.jsonl")

            def load_doc(**metadata):
                return _read("doc.jsonl")
            """
        )
    )
    (root / "tiny_mc.yaml").write_text(
        textwrap.dedent(
            """
            task: tiny_mc
            custom_dataset: !function tiny_utils.load_mc
            output_type: multiple_choice
            test_split: test
            doc_to_text: "{{q}}"
            doc_to_target: gold
            doc_to_choice: choices
            metric_list:
              - metric: acc
              - metric: acc_norm
            """
        )
    )
    (root / "tiny_doc.yaml").write_text(
        textwrap.dedent(
            """
            task: tiny_doc
            custom_dataset: !function tiny_utils.load_doc
            output_type: loglikelihood_rolling
            test_split: test
            doc_to_text: ""
            doc_to_target: text
            metric_list:
              - metric: bits_per_byte
              - metric: byte_perplexity
            """
        )
    )
    return {"dir": str(root), "mc": mc, "doc": long_doc}


def test_acc_acc_norm_and_rolling_perplexity_through_lm_eval(lm, run, host_model, tiny_tasks):
    results = run_eval(lm, "tiny_mc,tiny_doc", include_path=tiny_tasks["dir"])
    mc = results["results"]["tiny_mc"]
    preds, preds_norm = [], []
    for doc in tiny_tasks["mc"]:
        lls = [
            ll
            for ll, _ in lm.loglikelihood(
                [request("loglikelihood", doc["q"], " " + c) for c in doc["choices"]]
            )
        ]
        lengths = [len(c) for c in doc["choices"]]  # characters, without the delimiter
        preds.append(int(np.argmax(lls)) == doc["gold"])
        preds_norm.append(int(np.argmax([ll / n for ll, n in zip(lls, lengths)])) == doc["gold"])
    assert preds != preds_norm, "the hand-built docs should separate acc from acc_norm"
    assert mc["acc,none"] == pytest.approx(np.mean(preds))
    assert mc["acc_norm,none"] == pytest.approx(np.mean(preds_norm))
    n = len(preds)
    assert mc["acc_stderr,none"] == pytest.approx(np.std(preds, ddof=1) / math.sqrt(n))
    assert results["n-samples"]["tiny_mc"]["effective"] == n

    # Rolling loglikelihood over a document several contexts long, then bits per byte.
    text, max_len = tiny_tasks["doc"], run.model_cfg.max_seq_len
    ids = run.vocab.encode(text)
    assert len(ids) > 2 * max_len
    want = reference_rolling(host_model, ids, lm.start_id, max_len)
    (got,) = lm.loglikelihood_rolling([request("loglikelihood_rolling", text)])
    assert got == pytest.approx(want, rel=1e-5)
    n_bytes = len(text.encode("utf-8"))
    bpb = results["results"]["tiny_doc"]["bits_per_byte,none"]
    assert bpb == pytest.approx(-want / n_bytes / math.log(2), rel=1e-5)
    assert results["results"]["tiny_doc"]["byte_perplexity,none"] == pytest.approx(2**bpb)


def test_generate_until_honours_until_and_max_gen_toks(lm, run):
    from lm.inference.engine import SamplingParams

    prompt = "data is packed and"
    free = lm.engine.generate([lm.tok_encode(prompt)], SamplingParams(max_tokens=12, temperature=0))
    ids, text = free[0].token_ids, free[0].text
    assert len(ids) == 12 and len(text) > 8, "the tiny model should not stop at once"
    stop = text[4:7]
    cut = text[: text.index(stop)]
    assert len(cut) >= 2, f"pick a stop string that first occurs later in {text!r}"
    args = [
        (prompt, {"until": [], "max_gen_toks": 12, "do_sample": False}),
        (prompt, {"until": [stop], "max_gen_toks": 12}),
        (prompt, {"until": [], "max_gen_toks": 3}),
        (prompt, {"until": "\u00a7never", "max_gen_toks": 12, "temperature": 0.0}),
    ]
    got = lm.generate_until([request("generate_until", *a) for a in args])
    assert got[0] == text
    assert got[1] == cut and stop not in got[1]
    assert got[2] == run.vocab.decode(ids[:3])
    assert got[3] == text


def test_lm_eval_cli_on_the_offline_group(tiny_workdir, capsys):
    code = lm_main(["eval", f"--workdir={tiny_workdir}", "--tasks=lm_python", "--limit=3"])
    assert code == 0
    printed = capsys.readouterr().out
    results = json.load(open(os.path.join(tiny_workdir, "eval", "results.json")))
    table = open(os.path.join(tiny_workdir, "eval", "results.md")).read()
    section = open(os.path.join(tiny_workdir, "report.md")).read().split("## Evaluation")[1]
    assert results["lm_step"] == 30 and results["lm_settings"]["limit"] == 3
    tasks = {"lm_py_funcname", "lm_py_brackets", "lm_py_line", "lm_py_perplexity"}
    assert tasks <= set(results["results"])
    rows = report.metric_rows(results)
    assert {r["task"] for r in rows} == tasks and all(r["n"] == 3 for r in rows)
    metrics = {(r["task"], r["metric"]) for r in rows}
    for name in ("acc", "acc_norm"):
        assert ("lm_py_funcname", name) in metrics
    assert ("lm_py_line", "edit_similarity") in metrics
    assert ("lm_py_perplexity", "bits_per_byte") in metrics
    for row in rows:  # the same numbers in the JSON, the .md, the report and on stdout
        value = results["results"][row["task"]][row["metric"] + ",none"]
        line = f"| {row['task']} | {row['metric']} | {report._number(value)} |"
        assert line in table and line in section and line in printed
    assert printed == table.split("\n", 2)[2]
    # Run again: the report keeps one Evaluation section, still before the config.
    assert (
        lm_main(["eval", f"--workdir={tiny_workdir}", "--tasks=lm_py_funcname", "--limit=2"]) == 0
    )
    text = open(os.path.join(tiny_workdir, "report.md")).read()
    assert text.count("## Evaluation") == 1 and text.index("## Evaluation") < text.index(
        "## Config"
    )
    assert "| lm_py_funcname | acc |" in text and "lm_py_line" not in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tasks=lm_python"], "is not an `lm train` run"),
        (["--tasks=lm_python", "--bogus=1"], "unrecognized arguments"),
        (["--tasks=no_such_task_xyz"], "unknown task 'no_such_task_xyz'; the offline tasks are"),
    ],
)
def test_user_mistakes_are_one_line_errors(tiny_workdir, tmp_path, capsys, argv, message):
    workdir = str(tmp_path / "missing") if "not an" in message else tiny_workdir
    assert lm_main(["eval", f"--workdir={workdir}", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if "unknown task" in message:
        assert "lm_py_funcname" in err[0] and "lm_python" in err[0]


def test_make_tasks_cuts_lines_at_their_closing_brackets():
    source = "def f(x):\n    y = g(h(x, [1, 2]))\n    return {'a': (y)}\n"
    docs = make_tasks.bracket_docs([("m.py", source)])
    assert {d["answer"]: d["context"] for d in docs} == {
        "]))": "def f(x):\n    y = g(h(x, [1, 2",
        ")}": "def f(x):\n    y = g(h(x, [1, 2]))\n    return {'a': (y",
    }
    meaning = {"alpha": "first", "beta": "second", "gamma": "third", "delta": "4th", "omega": "end"}
    module = "".join(
        f'def {name}():\n    """Returns the {what} of the thing."""\n'
        for name, what in meaning.items()
    )
    questions = make_tasks.funcname_docs([("pkg/mod.py", module)])
    assert len(questions) == 5
    for doc in questions:
        assert doc["module"] == "pkg.mod" and len(set(doc["choices"])) == 4
        assert doc["docstring"].split()[2] == meaning[doc["choices"][doc["answer"]]]


def test_registered_as_the_lm_eval_model_lm(tiny_workdir):
    from lm_eval.api.registry import get_model

    assert get_model("lm") is LMEvalModel
    model = LMEvalModel.create_from_arg_string(
        f"workdir={tiny_workdir},step=30,batch_size=3", {"batch_size": None, "device": "cpu"}
    )
    assert model.parts.step == 30 and model.batch_size == 3
    assert model.scorer.batch_rows == 8  # rows split evenly over the 8 devices
    with pytest.raises(FileNotFoundError, match="no checkpoint 7"):
        LMEvalModel.create_from_arg_string(f"workdir={tiny_workdir},step=7")


class _FakeTerminal:
    """A stderr that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.parts = []

    def isatty(self):
        return True

    def write(self, text):
        self.parts.append(text)

    def flush(self):
        pass


def test_lm_eval_shows_progress_for_each_kind_of_request(lm, monkeypatch, stage_updates):
    # Issue 20 item 4: `lm eval` showed nothing until the table. Each request kind is a stage
    # with counts, drawn on a terminal's stderr and timed (lm.stages.timings()).
    from lm import stages

    updates = stage_updates
    terminal = _FakeTerminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setitem(stages.stage.__wrapped__.__kwdefaults__, "after", 0.0)  # draw at once
    seen = len(stages.timings())
    run_eval(lm, "lm_python", limit=3, bootstrap_iters=0)
    names = [name for name, _ in stages.timings()[seen:]]
    kinds = {
        "evaluating lm_py_funcname (loglikelihood)",
        "evaluating lm_py_brackets, lm_py_line (generate_until)",
        "evaluating lm_py_perplexity (rolling loglikelihood)",
    }
    assert kinds <= set(names) and "preparing the requests (lm-eval)" in names
    final = {}
    for name, done, total in updates:
        final[name] = (done, total)
    # 3 documents of each of the two generation tasks, all 6 generated.
    assert final["evaluating lm_py_brackets, lm_py_line (generate_until)"] == (6, 6)
    done, total = final["evaluating lm_py_funcname (loglikelihood)"]
    assert done == total and total >= 3 * 2  # 3 documents, two or more choices each
    done, total = final["evaluating lm_py_perplexity (rolling loglikelihood)"]
    assert done == total >= 3  # one or more windows per document
    shown = "".join(terminal.parts)
    assert "\revaluating lm_py_brackets, lm_py_line (generate_until) 0/6" in shown.replace(
        "\x1b[2K", ""
    )
    assert "evaluating lm_py_brackets, lm_py_line (generate_until): " in shown
