"""`lm convert --from_hf=DIR --workdir=W` and `lm convert --workdir=W --to_hf=DIR`."""

from __future__ import annotations

from lm.errors import ConfigError


def run_convert(args) -> int:
    """Runs one direction of the conversion from the parsed `lm convert` flags; prints a line."""
    from lm.convert.workdir import export_hf, import_hf

    if bool(args.from_hf) == bool(args.to_hf):
        raise ConfigError("lm convert needs exactly one of --from_hf=DIR or --to_hf=DIR")
    if args.from_hf:
        if args.step is not None:
            raise ConfigError("--step is for --to_hf (an import always writes checkpoint 0)")
        out = import_hf(args.from_hf, args.workdir, vocab_multiple=args.vocab_multiple)
        print(
            f"imported {out['architecture']} ({out['params'] / 1e6:.2f}M params, vocab "
            f"{out['vocab_size']}) -> {out['workdir']} (checkpoint 0)"
        )
        return 0
    out = export_hf(args.workdir, args.to_hf, args.step)
    print(
        f"exported step {out['step']} as {out['architecture']} -> {out['out_dir']} "
        f"({', '.join(out['files'])})"
    )
    return 0
