"""Prints the Hugging Face logit-parity table: family x dtype -> max |dlogit|, mean KL.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 .venv/bin/python benchmarks/parity_table.py

Each family's tiny transformers model (lm/convert/parity.py: 2 layers, hidden 64, 4 heads,
vocab 300, seeded random weights, nothing downloaded) is imported with `lm convert`'s
`import_hf`; our logits in float32 and in bfloat16 compute (float32 params) are compared with
transformers' float32 logits on the same token ids. A family whose import or forward pass fails
(a model feature not implemented yet) is listed with the error. Bounds: float32 max |dlogit|
<= 1e-4, bfloat16 mean KL <= 0.015 (parity.FP32_MAX_ABS / BF16_MAX_KL); the exit status is 1
when a family is out of its bound or not measured.
"""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(families: list[str] | None = None) -> tuple[list[dict], list[str]]:
    """(table rows, failures) for the given TINY families (all by default)."""
    from lm.convert import parity
    from lm.convert.workdir import import_hf

    rows, failures = [], []
    ids = parity.token_ids()
    with tempfile.TemporaryDirectory() as tmp:
        for family in families or list(parity.TINY):
            hf_dir, workdir = os.path.join(tmp, family), os.path.join(tmp, f"{family}-w")
            try:
                reference = parity.hf_logits(parity.tiny_model(family, hf_dir), ids)
                import_hf(hf_dir, workdir)
                for dtype in ("float32", "bfloat16"):
                    ours = parity.lm_logits(workdir, ids, dtype)
                    rows.append(
                        {"family": family, "dtype": dtype, **parity.compare(reference, ours)}
                    )
            except Exception as e:  # noqa: BLE001 - reported in the table's notes
                failures.append(f"{family}: {type(e).__name__}: {str(e).splitlines()[0]}")
    return rows, failures


def main() -> int:
    from lm.convert.parity import markdown_table, within_bounds

    rows, failures = measure(sys.argv[1:] or None)
    print(markdown_table(rows))
    for line in failures:
        print(f"\nnot measured: {line}")
    return 0 if rows and not failures and all(within_bounds(r["dtype"], r) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
