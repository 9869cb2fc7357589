"""`lm serve --workdir=W [--host=127.0.0.1] [--port=8000] [--api_key=KEY] [--slots=8]
[--max_queue=256] [--step=N] [--weight_bits=0|8|4] [--model_name=NAME] [--max_body_bytes=N]
[--head_timeout_s=S] [--body_timeout_s=S]`.

Serves a run's checkpoint with the OpenAI-compatible API (lm/serve/app.py) and the chat page at
`/`. The API key may also come from the LM_API_KEY environment variable. The engine compiles its
steps on one short request before the port opens, so the first client does not wait for XLA.
"""

from __future__ import annotations

import argparse
import os
import sys

from lm import storage
from lm.errors import ConfigError
from lm.serve.limits import Limits


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lm serve", description="an OpenAI-compatible API and chat page for a checkpoint"
    )
    parser.add_argument("--workdir", required=True, help="a training run's directory")
    parser.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every address")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api_key", default=None, help="required bearer key (or LM_API_KEY)")
    parser.add_argument("--slots", type=int, default=8, help="sequences decoded at once")
    parser.add_argument("--max_queue", type=int, default=256, help="waiting requests; then 429")
    parser.add_argument("--prefill_chunk", type=int, default=256, help="prompt tokens a step")
    parser.add_argument(
        "--adapter",
        default=None,
        help="a LoRA `lm finetune` run: serve --workdir (its base) with these adapters merged",
    )
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (newest)")
    parser.add_argument("--weight_bits", type=int, default=0, choices=(0, 8, 4))
    parser.add_argument("--group_size", type=int, default=128, help="int4 weight group size")
    parser.add_argument("--model_name", default=None, help="the API's model id (workdir's name)")
    parser.add_argument("--log_level", default="info", choices=("warning", "info", "debug"))
    default = Limits()
    parser.add_argument(
        "--max_body_bytes", type=int, default=default.max_body_bytes, help="larger bodies: 413"
    )
    parser.add_argument(
        "--head_timeout_s",
        type=float,
        default=default.head_timeout_s,
        help="seconds a connection has to send a request's headers; then it is closed",
    )
    parser.add_argument(
        "--body_timeout_s",
        type=float,
        default=default.body_timeout_s,
        help="seconds a request has to send its body; then 408",
    )
    return parser


def _limits(args: argparse.Namespace) -> Limits:
    """The connection limits the flags ask for (ConfigError for a value that is not positive)."""
    return Limits(
        max_body_bytes=args.max_body_bytes,
        head_timeout_s=args.head_timeout_s,
        body_timeout_s=args.body_timeout_s,
    )


def _check(args: argparse.Namespace) -> None:
    if not storage.exists(args.workdir):
        raise ConfigError(f"--workdir {args.workdir!r} does not exist")
    if args.adapter and not storage.exists(storage.join(args.adapter, "adapter.json")):
        raise ConfigError(f"--adapter {args.adapter!r} is not a LoRA run (no adapter.json)")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535, got {args.port}")
    for name in ("slots", "max_queue", "prefill_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} must be at least 1, got {getattr(args, name)}")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    _check(args)
    limits = _limits(args)
    import uvicorn

    from lm.inference.engine import Engine, SamplingParams
    from lm.serve.app import create_app
    from lm.serve.limits import uvicorn_options
    from lm.serve.runner import bind_socket

    sock = bind_socket(args.host, args.port)  # before loading: a taken port fails at once
    sizes = dict(slots=args.slots, max_queue=args.max_queue, prefill_chunk=args.prefill_chunk)
    quant = dict(weight_bits=args.weight_bits, group_size=args.group_size)
    if args.adapter:
        from lm.finetune.restore import restore_finetuned
        from lm.training.restore import restore_run

        run = restore_finetuned(
            args.adapter, args.step, restore_base=restore_run, base_workdir=args.workdir
        )
        engine = Engine.from_run(run, **quant, **sizes)
    else:
        engine = Engine.from_workdir(args.workdir, step=args.step, **quant, **sizes)
    warm = engine.encode_prompt("Hello")
    engine.generate([warm], SamplingParams(max_tokens=2, temperature=0.0))
    served = args.adapter or args.workdir
    name = args.model_name or os.path.basename(os.path.normpath(served)) or "lm"
    app = create_app(engine, model_name=name, api_key=args.api_key, limits=limits)
    host = f"[{args.host}]" if ":" in args.host else args.host
    port = sock.getsockname()[1]
    print(f"serving {name!r} at http://{host}:{port} (chat page at /)", file=sys.stderr)
    config = uvicorn.Config(
        app, log_level=args.log_level, timeout_graceful_shutdown=5, **uvicorn_options(limits)
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0
