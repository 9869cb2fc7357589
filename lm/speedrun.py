"""`make speedrun`: the whole lifecycle that exists so far, on the embedded corpus, on CPU.

Stages: curate the standard library's source with the Beam data pipeline (clean, filter,
deduplicate, scrub PII), train a tokenizer on the curated documents, pretrain the `tiny`
experiment on them (checkpoints, validation, report), then sample from the final checkpoint.
Each stage's wall time goes into `<workdir>/speedrun.md`.
"""

from __future__ import annotations

import os
import time

from lm.config import get_config


def speedrun(workdir: str) -> int:
    from lm.data.documents import iter_documents
    from lm.inference.sample import generate_text
    from lm.tokenizer.sentencepiece_tokenizer import (
        compression_report,
        load_vocabulary,
        train_tokenizer,
    )
    from lm.training.loop import train
    from lm.training.restore import restore_params

    os.makedirs(workdir, exist_ok=True)
    timings: list[tuple[str, float]] = []
    from lm.curate.cli import main as data_main

    t0 = time.perf_counter()
    data_dir = os.path.join(workdir, "data")
    print("== 1/4 data: curate the standard library (Beam DirectRunner)", flush=True)
    if data_main(["run", "--pipeline=stdlib", f"--output={data_dir}"]) != 0:
        return 1
    print(f"   data report: {os.path.join(data_dir, 'data_report.md')}")
    timings.append(("data", time.perf_counter() - t0))
    cfg = get_config("tiny", ["--config.data.source=curated", f"--config.data.path={data_dir}"])

    t0 = time.perf_counter()
    print("== 2/4 tokenizer: SentencePiece BPE on the curated documents", flush=True)
    spm = train_tokenizer(cfg.data, cfg.tokenizer, os.path.join(workdir, "tokenizer"))
    vocab = load_vocabulary(spm)
    comp = compression_report(vocab, iter_documents(cfg.data, "validation"))
    print(f"   {spm}: vocab {vocab.vocab_size}, {comp['bytes_per_token']:.2f} bytes/token held out")
    timings.append(("tokenizer", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("== 3/4 pretrain `tiny` (resumes if interrupted)", flush=True)
    cfg.tokenizer.path = os.path.abspath(spm)
    train_dir = os.path.join(workdir, "tiny")
    summary = train(cfg, train_dir)
    timings.append(("pretrain", time.perf_counter() - t0))

    t0 = time.perf_counter()
    print("\n== 4/4 evaluate and sample from the final checkpoint", flush=True)
    graphdef, params, model_cfg, vocab, step = restore_params(train_dir)
    prompt = "def "
    text = generate_text(
        graphdef, params, model_cfg, vocab, [prompt], max_new_tokens=96, temperature=0.7, top_k=40
    )[0]
    timings.append(("sample", time.perf_counter() - t0))

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
    ]
    with open(os.path.join(workdir, "speedrun.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"--- sample (checkpoint {step}) ---\n{prompt}{text}\n---")
    if val:
        print(f"validation loss {val['loss']:.4f}  bits/byte {val['bits_per_byte']:.3f}")
    print(f"report: {summary['report']}")
    print(f"speedrun summary: {os.path.join(workdir, 'speedrun.md')}")
    return 0
