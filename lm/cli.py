"""The `lm` command: experiments, tokenizer train, train, finetune, sample, plan, convert,
quantize, data run, eval, serve, speedrun.

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
    from lm.stages import break_line_before_logs

    break_line_before_logs()  # a warning never lands glued onto a live progress line


def _experiment_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text)
    p.add_argument("--experiment", required=True, help="name of a module in experiments/")
    return p


def cmd_experiments(args, _overrides) -> int:
    from lm.config import list_experiments

    names = list_experiments()
    width = max(map(len, names))
    for name, description in names.items():
        if getattr(args, "params", False):
            description = f"{_param_summary(name)}  {description}"
        print(f"{name:<{width}}  {description}")
    return 0


def _param_summary(name: str) -> str:
    """ "124.48M params" (", 30.1M active" where routing makes them differ), from shapes only."""
    from lm.config import get_config
    from lm.errors import ConfigError
    from lm.models.transformer import experiment_param_counts

    try:
        total, active = experiment_param_counts(get_config(name))
    except ConfigError:
        return f"{'? params':>15}"
    text = f"{total / 1e6:>8.2f}M params"
    return text if active == total else f"{text} ({active / 1e6:.2f}M active)"


def cmd_train(args, overrides) -> int:
    from lm import distributed
    from lm.config import get_config

    # The config is checked first (it starts no backend), so a mistyped flag fails every host
    # before the job is joined, not one host mid-join.
    cfg = get_config(args.experiment, overrides)
    distributed.initialize()  # before anything starts the backend
    from lm.training.loop import Preempted, train

    try:
        summary = train(cfg, args.workdir)
    except Preempted as e:
        return 128 + e.signum
    import jax

    if jax.process_index():
        return 0  # every host trained, evaluated and sampled; one prints
    val = summary.get("validation", {})
    if val:
        bpb = f"  bits/byte {val['bits_per_byte']:.3f}" if "bits_per_byte" in val else ""
        print(f"validation loss {val['loss']:.4f}  perplexity {val['perplexity']:.2f}{bpb}")
    for prompt, text in summary.get("samples", []):
        print(f"--- sample ---\n{prompt}{text}")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0


def cmd_finetune(args, overrides) -> int:
    from lm import distributed
    from lm.config import get_config

    extra = [f"--config.finetune.init={args.init}"] if args.init else []
    cfg = get_config(args.experiment, [*overrides, *extra])
    distributed.initialize()
    from lm.finetune.recipe import apply_imported_recipe
    from lm.finetune.run import finetune
    from lm.training.guards import Preempted

    apply_imported_recipe(cfg, overrides)  # an hf: init gets a fine-tuning learning rate
    try:
        summary = finetune(cfg, args.workdir)
    except Preempted as e:
        return 128 + e.signum
    import jax

    if jax.process_index():
        return 0
    print("\n".join(summary.get("lines") or []))
    print(f"finetuned: {args.workdir}")
    return 0


def cmd_tokenizer_train(args, overrides) -> int:
    # TensorFlow-free (sentencepiece alone), so none of its start-up lines are printed.
    from lm.config import get_config
    from lm.data.documents import iter_documents
    from lm.stages import stage
    from lm.tokenizer.sentencepiece_tokenizer import compression_report, train_tokenizer
    from lm.tokenizer.vocab import load_vocab

    cfg = get_config(args.experiment, overrides)
    with stage("training the tokenizer"):
        path = train_tokenizer(cfg.data, cfg.tokenizer, args.output)
    vocab = load_vocab(path)
    with stage("measuring held-out compression"):
        report = compression_report(vocab, iter_documents(cfg.data, "validation"))
    print(f"tokenizer: {path} ({cfg.tokenizer.kind}, vocab {vocab.vocab_size})")
    print(
        f"held-out compression: {report['bytes_per_token']:.3f} bytes/token "
        f"over {report['bytes']} bytes"
    )
    return 0


def cmd_sample(args, _overrides) -> int:
    from lm import distributed

    distributed.initialize()  # before anything starts the backend
    import jax

    from lm.inference.sample import generate_text
    from lm.training.restore import restore_params

    graphdef, params, model_cfg, vocab, step = restore_params(args.workdir, args.step)
    if args.weight_bits:
        from lm.quantize.weights import quantize_loaded

        graphdef, params, model_cfg = quantize_loaded(
            graphdef, params, args.weight_bits, args.group_size
        )
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
    if jax.process_index():
        return 0  # every host samples (the params are sharded); one prints
    print(f"(checkpoint {step})", file=sys.stderr)
    for text in texts:
        print(args.prompt + text)
        if args.num_samples > 1:
            print("---")
    return 0


def cmd_speedrun(args, _overrides) -> int:
    from lm.speedrun import speedrun

    return speedrun(args.workdir)


def cmd_pod(args, rest) -> int:
    from lm.pod import run_pod

    command = rest[1:] if rest[:1] == ["--"] else rest
    return run_pod(command, args.processes, args.devices_per_process)


def cmd_plan(args, overrides) -> int:
    from lm.plan import plan

    lines, _ = plan(
        args.experiment,
        args.chips,
        args.tokens,
        overrides,
        mfu=args.mfu,
        price=args.price_per_chip_hour,
        pue=args.pue,
        watts=args.watts_per_chip,
        compile=not args.no_compile,
        timeout=args.compile_timeout,
    )
    print("\n".join(lines))
    return 0


def cmd_convert(args, _overrides) -> int:
    from lm.convert.cli import run_convert

    return run_convert(args)


def cmd_quantize(args, _overrides) -> int:
    from lm.quantize.weights import quantize_workdir

    print(quantize_workdir(args.workdir, args.out, bits=args.bits, group_size=args.group_size))
    return 0


def cmd_data(args, rest) -> int:
    from lm.curate.cli import main as data_main

    return data_main(rest)


def cmd_eval(args, rest) -> int:
    from lm.evaluation.cli import main as eval_main

    return eval_main(rest)


def cmd_serve(args, rest) -> int:
    from lm.serve.cli import main as serve_main

    return serve_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lm", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("experiments", help="list the named experiments")
    p.add_argument("--params", action="store_true", help="also print each model's param count")
    p.set_defaults(func=cmd_experiments)

    p = _experiment_parser(sub, "train", "train (or resume) an experiment in a workdir")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=cmd_train)

    p = _experiment_parser(
        sub, "finetune", "SFT / LoRA / domain adaptation / RM / DPO / PPO / GRPO from a checkpoint"
    )
    p.add_argument("--init", default="", help="the run to start from: a workdir, or hf:DIR")
    p.add_argument("--workdir", required=True)
    p.set_defaults(func=cmd_finetune)

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
    p.add_argument(
        "--weight_bits",
        type=int,
        default=0,
        choices=(0, 8, 4),
        help="quantize the weights at load time (as `lm quantize` would); 0: as saved",
    )
    p.add_argument("--group_size", type=int, default=128, help="int4: weights per scale")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("speedrun", help="the whole lifecycle on the embedded corpus, on CPU")
    p.add_argument("--workdir", default="runs/speedrun")
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser(
        "pod", help="run an lm command as N processes here (`lm pod --processes=2 -- train ...`)"
    )
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--devices_per_process", type=int, default=4)
    p.set_defaults(func=cmd_pod)

    p = _experiment_parser(sub, "plan", "FLOPs, time, energy, cost and memory of a run")
    p.add_argument("--chips", required=True, help="e.g. v5p-256 (v4/v5p count TensorCores)")
    p.add_argument(
        "--tokens", type=float, default=None, help="training tokens (default: Chinchilla-optimal)"
    )
    p.add_argument("--mfu", type=float, default=0.4)
    p.add_argument("--price_per_chip_hour", type=float, default=None)
    p.add_argument("--pue", type=float, default=1.1)
    p.add_argument("--watts_per_chip", type=float, default=None)
    p.add_argument("--no_compile", action="store_true", help="skip the XLA:CPU memory compile")
    p.add_argument("--compile_timeout", type=float, default=180.0)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser(
        "convert",
        help="Hugging Face checkpoints: --from_hf=DIR --workdir=W, or --workdir=W --to_hf=DIR",
    )
    p.add_argument("--workdir", required=True)
    p.add_argument("--from_hf", default="", help="a Hugging Face model directory to import")
    p.add_argument("--to_hf", default="", help="a directory to export safetensors + config to")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument(
        "--vocab_multiple",
        type=int,
        default=0,
        help="import: pad the vocabulary to a multiple of this (e.g. 128 for sharding)",
    )
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("quantize", help="weight-only int8/int4 copy of a run's checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", required=True, help="workdir for the quantized copy")
    p.add_argument("--bits", type=int, default=8, choices=(8, 4))
    p.add_argument("--group_size", type=int, default=128, help="int4: weights per scale")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("data", help="data curation (`lm data run --pipeline=NAME --output=DIR`)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "eval", help="benchmark and safety evals (`lm eval --workdir=W --tasks=a,b`)"
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("serve", help="OpenAI-compatible API and chat page (`lm serve --workdir=W`)")
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lm.distributed import take_job_flags
    from lm.errors import ConfigError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        argv = take_job_flags(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    parser = build_parser()
    if argv[:1] in (["data"], ["eval"], ["serve"]):
        args, rest = parser.parse_args(argv[:1]), argv[1:]
    elif argv[:1] == ["pod"]:
        cut = argv.index("--") if "--" in argv else len(argv)
        args, rest = parser.parse_args(argv[:cut]), argv[cut + 1 :]
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
    except KeyboardInterrupt:  # Ctrl-C (a server's usual stop): a line, not a traceback
        from lm.stages import LIVE

        LIVE.end()
        print("interrupted", file=sys.stderr)
        return 130


def _exit(code: int) -> None:
    """Exits; a failing process of a pod exits at once, skipping jax's shutdown barrier (which
    would wait for the other processes, themselves stuck at a collective with this one)."""
    if code and "jax" in sys.modules and sys.modules["jax"].distributed.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    try:
        code = main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - printed, then the exit status says it failed
        import traceback

        traceback.print_exc()
        code = 1
    _exit(code)
