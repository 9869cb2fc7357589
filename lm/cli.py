"""The `lm` command: experiments, tokenizer train, train, sample, data run, speedrun.

User mistakes (unknown experiment, bad override, missing file, bad data) print one line naming
what to fix and exit with status 2; they never print a stack trace.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _user_errors() -> tuple[type[Exception], ...]:
    from lm.errors import LMError

    return (LMError, FileNotFoundError)


def quiet_logs() -> None:
    """`HH:MM:SS LEVEL message` log lines, without the libraries' INFO chatter (also used by
    the child process that builds data caches, whose lines the parent relays)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("absl", "jax._src", "orbax", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _experiment_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--experiment", required=True, help="name of a module in experiments/")
    return p


def cmd_experiments(_args, _overrides) -> int:
    from lm.config import list_experiments

    names = list_experiments()
    width = max(map(len, names))
    for name, description in names.items():
        print(f"{name:<{width}}  {description}")
    return 0


def cmd_train(args, overrides) -> int:
    from lm.config import get_config
    from lm.training.loop import Preempted, train

    cfg = get_config(args.experiment, overrides)
    try:
        summary = train(cfg, args.workdir)
    except Preempted as e:
        return 128 + e.signum
    val = summary.get("validation", {})
    if val:
        bpb = f"  bits/byte {val['bits_per_byte']:.3f}" if "bits_per_byte" in val else ""
        print(f"validation loss {val['loss']:.4f}  perplexity {val['perplexity']:.2f}{bpb}")
    for prompt, text in summary.get("samples", []):
        print(f"--- sample ---\n{prompt}{text}")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0


def cmd_tokenizer_train(args, overrides) -> int:
    from lm.config import get_config
    from lm.data.sources import iter_documents
    from lm.tokenizer.sentencepiece_tokenizer import (
        compression_report,
        load_vocabulary,
        train_tokenizer,
    )

    cfg = get_config(args.experiment, overrides)
    path = train_tokenizer(cfg.data, cfg.tokenizer, args.output)
    vocab = load_vocabulary(path)
    report = compression_report(vocab, iter_documents(cfg.data, "validation"))
    print(f"tokenizer: {path} ({cfg.tokenizer.kind}, vocab {vocab.vocab_size})")
    print(
        f"held-out compression: {report['bytes_per_token']:.3f} bytes/token "
        f"over {report['bytes']} bytes"
    )
    return 0


def cmd_sample(args, _overrides) -> int:
    from lm.inference.sample import generate_text
    from lm.training.loop import restore_params

    graphdef, params, model_cfg, vocab, step = restore_params(args.workdir, args.step)
    texts = generate_text(
        graphdef,
        params,
        model_cfg,
        vocab,
        [args.prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        num_samples=args.num_samples,
    )
    print(f"(checkpoint {step})", file=sys.stderr)
    for text in texts:
        print(args.prompt + text)
        if args.num_samples > 1:
            print("---")
    return 0


def cmd_speedrun(args, _overrides) -> int:
    from lm.speedrun import speedrun

    return speedrun(args.workdir)


def cmd_data(args, rest) -> int:
    from lm.curate.cli import main as data_main

    return data_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("experiments", help="list the named experiments")
    p.set_defaults(func=cmd_experiments)

    p = _experiment_parser(sub, "train", "train (or resume) an experiment in a workdir")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(
        dest="tokenizer_command", required=True
    )
    p = _experiment_parser(tok, "train", "train a SentencePiece tokenizer on an experiment's data")
    p.add_argument("--output", required=True, help="directory for spm.model")
    p.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("sample", help="sample from a run's checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", default="")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--num_samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("speedrun", help="the whole lifecycle on the embedded corpus, on CPU")
    p.add_argument("--workdir", default="runs/speedrun")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("data", help="data curation (`lm data run --pipeline=NAME --output=DIR`)")
    p.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if argv[:1] == ["data"]:
        args, rest = parser.parse_args(argv[:1]), argv[1:]
    else:
        args, rest = parser.parse_known_args(argv)
        bad = [a for a in rest if not a.startswith("--config.")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
    quiet_logs()
    try:
        return args.func(args, rest)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
