"""Evaluation: `lm eval` runs lm-evaluation-harness tasks on a run (harness.py registers `lm`
as an lm-eval model; scoring.py is the batched log-likelihood math; tasks/ holds offline
tasks made from the stdlib). `run_eval` (cli.py) is the Python entry point; importing this
package imports nothing heavy."""


def __getattr__(name: str):
    if name == "run_eval":
        from lm.evaluation.cli import run_eval

        return run_eval
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
