"""`make speedrun`: the whole lifecycle that exists so far, on the embedded corpus, on CPU.

Stages: curate the standard library's source with the Beam data pipeline (clean, filter,
deduplicate, scrub PII), train a tokenizer on the curated documents, pretrain the `tiny`
experiment on them (checkpoints, validation, report), sample from it, fine-tune it to chat
(SFT on docstring -> signature conversations) and align it (DPO on preference pairs), evaluate
the pretrained and the aligned checkpoints on the offline benchmark and safety tasks (lm-eval),
then deploy the aligned one: `lm serve`'s app on 127.0.0.1, one chat request through the
official `openai` client, and the server stopped again. Each stage's wall time and its metric
next to the previous stage's go into `<workdir>/speedrun.md`, the report card.
"""

from __future__ import annotations

import os
import time

from lm.config import get_config

EVAL_TASKS = ["lm_python", "lm_safety"]
EVAL_LIMIT = 40


def _finetune_stage(name: str, init: str, workdir: str) -> dict:
    """`lm finetune --experiment=<name> --init=<init> --workdir=<workdir>`; its summary."""
    from lm.finetune.run import finetune

    return finetune(get_config(name, [f"--config.finetune.init={init}"]), workdir)


def _eval_values(results: dict) -> dict[str, float]:
    """{"task metric": value} of an lm-eval results dict (stderr left out)."""
    out = {}
    for task, metrics in sorted(results["results"].items()):
        for key, value in metrics.items():
            if isinstance(value, float) and "stderr" not in key:
                out[f"{task} {key.split(',')[0]}"] = value
    return out


def _deploy_and_chat(run) -> tuple[str, str]:
    """Serves the run on a free port, asks one chat question through the `openai` package, and
    stops the server; returns (question, reply)."""
    import openai

    from lm.finetune import make_data
    from lm.inference.engine import Engine
    from lm.serve.app import create_app
    from lm.serve.runner import ServerThread

    engine = Engine.from_run(run, slots=4)
    app = create_app(engine, model_name="tiny", api_key="speedrun-key")
    question = make_data.PROMPT_PREFIX + "return the sum of a list of numbers."
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
    print("== 1/8 data: curate the standard library (Beam DirectRunner)", flush=True)
    if data_main(["run", "--pipeline=stdlib", f"--output={data_dir}"]) != 0:
        return 1
    print(f"   data report: {os.path.join(data_dir, 'data_report.md')}")
    timings.append(("data", time.perf_counter() - t0))
    cfg = get_config("tiny", ["--config.data.source=curated", f"--config.data.path={data_dir}"])

    t0 = time.perf_counter()
    print("== 2/8 tokenizer: SentencePiece BPE on the curated documents", flush=True)
    spm = train_tokenizer(cfg.data, cfg.tokenizer, os.path.join(workdir, "tokenizer"))
    vocab = load_vocabulary(spm)
    comp = compression_report(vocab, iter_documents(cfg.data, "validation"))
    print(f"   {spm}: vocab {vocab.vocab_size}, {comp['bytes_per_token']:.2f} bytes/token held out")
    timings.append(("tokenizer", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("== 3/8 pretrain `tiny` (resumes if interrupted)", flush=True)
    cfg.tokenizer.path = os.path.abspath(spm)
    train_dir = os.path.join(workdir, "tiny")
    summary = train(cfg, train_dir)
    timings.append(("pretrain", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("\n== 4/8 sample from the final checkpoint", flush=True)
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

    from lm.finetune.chat_eval import answer_format, held_out_instructions

    t0 = time.perf_counter()
    print("== 5/8 SFT: `sft_tiny` (docstring -> signature chats, loss on the assistant only)")
    sft_dir = os.path.join(workdir, "sft")
    sft = _finetune_stage("sft_tiny", train_dir, sft_dir)
    chat_prompts = held_out_instructions(50)
    formats = {"pretrained": answer_format(run, chat_prompts)}
    formats["sft"] = answer_format(restore_run(sft_dir), chat_prompts)
    timings.append(("sft", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("== 6/8 align: `dpo_tiny` (DPO on preference pairs, from the SFT checkpoint)")
    dpo_dir = os.path.join(workdir, "dpo")
    dpo = _finetune_stage("dpo_tiny", sft_dir, dpo_dir)
    aligned = restore_run(dpo_dir)
    formats["dpo"] = answer_format(aligned, chat_prompts)
    timings.append(("dpo", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print(f"== 7/8 evaluate: {', '.join(EVAL_TASKS)} (lm-eval), pretrained and aligned")
    from lm.evaluation.cli import run_eval

    before = _eval_values(run_eval(run, EVAL_TASKS, limit=EVAL_LIMIT, workdir=train_dir))
    after = _eval_values(run_eval(aligned, EVAL_TASKS, limit=EVAL_LIMIT, workdir=dpo_dir))
    table = ["| task metric | pretrained | aligned (SFT + DPO) |", "|---|---|---|"]
    table += [f"| {k} | {v:.4f} | {after.get(k, float('nan')):.4f} |" for k, v in before.items()]
    print("\n".join(table))
    timings.append(("evaluate", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("== 8/8 deploy: lm serve (aligned model) on 127.0.0.1, one chat with the openai client")
    question, reply = _deploy_and_chat(aligned)
    print(f"   user: {question}\n   assistant: {reply!r}")
    timings.append(("deploy", time.perf_counter() - t0))

    val = summary.get("validation", {})
    sft_before, sft_after = sft["validation_before"], sft["validation"]
    dpo_before, dpo_after = dpo["validation_before"], dpo["validation"]
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
        "## Fine-tuning and alignment, each stage next to the one before",
        "",
        "| measure (held out) | pretrained | SFT | DPO |",
        "|---|---|---|---|",
        f"| SFT loss on assistant tokens | {sft_before['loss']:.4f} | {sft_after['loss']:.4f} | |",
        f"| DPO preference accuracy (own log-probs) | | "
        f"{dpo_before['preference_accuracy']:.3f} | {dpo_after['preference_accuracy']:.3f} |",
        f"| DPO reward margin | | {dpo_before['rewards/margin']:.3f} | "
        f"{dpo_after['rewards/margin']:.3f} |",
    ]
    for key, label in (("ended_turn", "replies that end their turn"), ("signature", "well-formed")):
        lines.append(
            f"| {label} (50 prompts, greedy) | {formats['pretrained'][key]:.2f} | "
            f"{formats['sft'][key]:.2f} | {formats['dpo'][key]:.2f} |"
        )
    lines += ["", "Replies to held-out requests (greedy):", ""]
    for stage, result in formats.items():
        lines.append(f"- {stage}: {result['replies'][0]!r}")
    lines += [
        "",
        f"## Evaluation (lm-eval, up to {EVAL_LIMIT} docs a task)",
        "",
        *table,
        "",
        "## Deployment",
        "",
        "`lm serve` (the aligned model) answered one chat request from the `openai` client:",
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
