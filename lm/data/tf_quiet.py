"""TensorFlow, imported quietly and on the CPU only, for the processes that need it (packing with
seqio, SentencePiece training through seqio vocabularies); the trainer never imports it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

_TF = None


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 points at /dev/null inside the block (C++ libraries write there
    directly, past Python's sys.stderr)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to silence
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def tf_cpu_only():
    """Imports TensorFlow quietly with GPUs hidden (JAX owns the accelerators); returns it.

    Quietly: TensorFlow 2.19+ writes its start-up lines (oneDNN, "Could not find cuda drivers",
    "failed call to cuInit") to stderr before its log level applies, whatever
    TF_CPP_MIN_LOG_LEVEL says, so they go to /dev/null while TF loads and hides the GPUs; an
    import error still raises. Must run before TF's first op; later calls are no-ops.
    """
    global _TF
    if _TF is None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with _stderr_silenced():
            import tensorflow as tf

            try:
                tf.config.set_visible_devices([], "GPU")
            except RuntimeError:  # Devices already initialized by an earlier TF op.
                pass
        _TF = tf
    return _TF
