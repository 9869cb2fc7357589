"""`make speedrun`: the whole lifecycle that exists so far, on the embedded corpus, on CPU.

Stages: curate the standard library's source with the Beam data pipeline (clean, filter,
deduplicate, scrub PII), train a tokenizer on the curated documents, pretrain the `tiny`
experiment on them (checkpoints, validation, report), evaluate the final checkpoint on the
offline benchmark and safety tasks (lm-eval), then deploy it: `lm serve`'s app on 127.0.0.1,
one chat request through the official `openai` client, and the server stopped again.
Each stage's wall time goes into `<workdir>/speedrun.md`, the report card.
"""

from __future__ import annotations

import os
import time

from lm.config import get_config

EVAL_TASKS = ["lm_python", "lm_safety"]
EVAL_LIMIT = 40


def _deploy_and_chat(run) -> tuple[str, str]:
    """Serves the run on a free port, asks one chat question through the `openai` package, and
    stops the server; returns (question, reply)."""
    import openai

    from lm.inference.engine import Engine
    from lm.serve.app import create_app
    from lm.serve.runner import ServerThread

    engine = Engine.from_run(run, slots=4)
    app = create_app(engine, model_name="tiny", api_key="speedrun-key")
    question = "Write a function that returns the sum of a list."
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="speedrun-key")
        answer = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": question}],
            max_tokens=48,
            temperature=0.7,
            seed=0,
        )
    return question, answer.choices[0].message.content


def speedrun(workdir: str) -> int:
    from lm.data.documents import iter_documents
    from lm.inference.sample import generate_text
    from lm.tokenizer.sentencepiece_tokenizer import (
        compression_report,
        load_vocabulary,
        train_tokenizer,
    )
    from lm.training.loop import train
    from lm.training.restore import restore_run

    os.makedirs(workdir, exist_ok=True)
    timings: list[tuple[str, float]] = []
    from lm.curate.cli import main as data_main

    t0 = time.perf_counter()
    data_dir = os.path.join(workdir, "data")
    print("== 1/6 data: curate the standard library (Beam DirectRunner)", flush=True)
    if data_main(["run", "--pipeline=stdlib", f"--output={data_dir}"]) != 0:
        return 1
    print(f"   data report: {os.path.join(data_dir, 'data_report.md')}")
    timings.append(("data", time.perf_counter() - t0))
    cfg = get_config("tiny", ["--config.data.source=curated", f"--config.data.path={data_dir}"])

    t0 = time.perf_counter()
    print("== 2/6 tokenizer: SentencePiece BPE on the curated documents", flush=True)
    spm = train_tokenizer(cfg.data, cfg.tokenizer, os.path.join(workdir, "tokenizer"))
    vocab = load_vocabulary(spm)
    comp = compression_report(vocab, iter_documents(cfg.data, "validation"))
    print(f"   {spm}: vocab {vocab.vocab_size}, {comp['bytes_per_token']:.2f} bytes/token held out")
    timings.append(("tokenizer", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("== 3/6 pretrain `tiny` (resumes if interrupted)", flush=True)
    cfg.tokenizer.path = os.path.abspath(spm)
    train_dir = os.path.join(workdir, "tiny")
    summary = train(cfg, train_dir)
    timings.append(("pretrain", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("\n== 4/6 sample from the final checkpoint", flush=True)
    run = restore_run(train_dir)
    prompt = "def "
    text = generate_text(
        run.trainer.graphdef,
        run.params,
        run.model_cfg,
        run.vocab,
        [prompt],
        max_new_tokens=96,
        temperature=0.7,
        top_k=40,
    )[0]
    step = run.step
    timings.append(("sample", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print(f"== 5/6 evaluate: {', '.join(EVAL_TASKS)} (lm-eval, offline tasks)", flush=True)
    from lm.evaluation.cli import run_eval
    from lm.evaluation.report import markdown_table

    results = run_eval(run, EVAL_TASKS, limit=EVAL_LIMIT, workdir=train_dir)
    table = markdown_table(results)
    print(table)
    timings.append(("evaluate", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("== 6/6 deploy: lm serve on 127.0.0.1, one chat request with the openai client")
    question, reply = _deploy_and_chat(run)
    print(f"   user: {question}\n   assistant: {reply!r}")
    timings.append(("deploy", time.perf_counter() - t0))

    val = summary.get("validation", {})
    lines = ["# Speedrun", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {name} | {secs:.1f} |" for name, secs in timings]
    lines += ["", f"Tokenizer: {comp['bytes_per_token']:.3f} bytes/token on held-out text.", ""]
    if val:
        lines.append(
            f"Validation loss {val['loss']:.4f}, perplexity {val['perplexity']:.2f}, "
            f"bits/byte {val['bits_per_byte']:.3f} at step {step}."
        )
    lines += [
        "",
        f"Training report: {summary['report']}",
        "",
        "Sample:",
        "```",
        prompt + text,
        "```",
        "",
        f"## Evaluation (lm-eval, up to {EVAL_LIMIT} docs a task)",
        "",
        table,
        "",
        "## Deployment",
        "",
        "`lm serve` answered one chat request from the `openai` client:",
        "",
        f"- user: {question}",
        f"- assistant: {reply!r}",
    ]
    with open(os.path.join(workdir, "speedrun.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"--- sample (checkpoint {step}) ---\n{prompt}{text}\n---")
    if val:
        print(f"validation loss {val['loss']:.4f}  bits/byte {val['bits_per_byte']:.3f}")
    print(f"report: {summary['report']}")
    print(f"speedrun summary: {os.path.join(workdir, 'speedrun.md')}")
    return 0
