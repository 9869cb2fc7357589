"""Orbax checkpoints of the train state, with each host's data-iterator state beside them.

`<dir>/<step>/state` is an orbax checkpoint (every host writes its shards; saves are
asynchronous and only finalized steps are listed, so a run killed mid-save leaves a temporary
directory that is never loaded). `<dir>/data/<step>/process_<i>-of-<n>.json` is host i's
`data_iter.get_state()`, written by that host before the state save starts, so every host
restores its own position in its own shard of the data.

Restoring checks the checkpoint's tree and shapes against the configured model first: a
mismatch is a `CheckpointError` naming the first differing parameter (nothing is skipped or
deleted). A checkpoint whose files cannot be read (truncated, garbled) is renamed to
`<step>.corrupt` with a warning and the next older one is tried.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp

from lm import distributed, storage
from lm.errors import CheckpointError

DATA_DIR = "data"


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _shapes(tree: Any) -> dict[str, tuple]:
    """`a.b.0.c` -> shape for every array leaf (None leaves, e.g. empty optax states, dropped)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, x in leaves:
        name = ".".join(_key_name(k) for k in path)
        out[name.removesuffix(".value")] = tuple(x.shape)  # nnx.Variable's own field
    return out


def first_mismatch(saved: Any, expected: Any) -> str | None:
    """One line naming the first parameter whose presence or shape differs, or None."""
    have, want = _shapes(saved), _shapes(expected)
    for name, shape in want.items():
        if name not in have:
            return f"{name} (shape {shape}) is missing from the checkpoint"
        if have[name] != shape:
            return f"{name} has shape {have[name]} in the checkpoint but {shape} in this config"
    extra = [name for name in have if name not in want]
    if extra:
        return f"{extra[0]} (shape {have[extra[0]]}) is in the checkpoint but not in this config"
    return None


def _params_only(tree: Any) -> bool:
    """Whether a checkpoint tree is `{"params": ...}` alone (an `lm quantize` checkpoint)."""
    names = list(_shapes(tree))
    return bool(names) and all(n.startswith("params.") for n in names)


def quantized_mismatch(saved: Any, expected: Any) -> str | None:
    """The rest of a one-line error when a weight-quantized (params-only) checkpoint meets code
    that wants a train state, or the reverse; None otherwise."""
    saved_q, want_q = _params_only(saved), _params_only(expected)
    if saved_q and not want_q:
        return (
            "is a weight-quantized inference checkpoint (`lm quantize`: int weights + scales, "
            "no optimizer state); it cannot be trained, resumed or read with "
            "model.weight_bits=0: sample or evaluate it with the config.json `lm quantize` "
            "wrote beside it, and train from the original run in a new --workdir"
        )
    if want_q and not saved_q:
        return (
            "is a full-precision training checkpoint but the config has model.weight_bits > 0; "
            "make a quantized copy with `lm quantize --workdir=RUN --out=NEW`"
        )
    return None


class Checkpointer:
    """`<directory>/<step>/state` + per-host data states; keeps the newest `keep` checkpoints.

    `every` is kept for callers; the trainer decides which steps to save. A step is saved at
    most once per run (a second `save` of the same step is a no-op).
    """

    def __init__(self, directory: str, *, keep: int, every: int = 1, async_save: bool = True):
        del every
        self.directory = storage.absolute(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )
        self._saved: set[int] = set()

    def _data_path(self, step: int, index: int | None = None, count: int | None = None) -> str:
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
        return storage.join(self.directory, DATA_DIR, str(step), f"process_{index}-of-{count}.json")

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = True) -> bool:
        """Starts saving checkpoint `step`; False (and nothing written) if this run saved it.

        Every host must call it with the same step (orbax saves are collective)."""
        del force
        if step in self._saved:
            return False
        if step in self.manager.all_steps():
            self._move_aside(step, "superseded")  # an older run's copy of this step
        storage.write_text(self._data_path(step), json.dumps(data_state))
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
        self._saved.add(step)
        self._prune_data()
        return True

    def _prune_data(self) -> None:
        if jax.process_index():
            return
        keep = {str(s) for s in self.manager.all_steps()} | {str(s) for s in self._saved}
        for name in storage.listdir(storage.join(self.directory, DATA_DIR)):
            if name.isdigit() and name not in keep:
                storage.remove(storage.join(self.directory, DATA_DIR, name))

    def _move_aside(self, step: int, why: str) -> None:
        """Renames `<step>` to `<step>.corrupt` (primary host), so orbax no longer lists it."""
        self.manager.wait_until_finished()
        self._saved.discard(step)
        if jax.process_index() == 0:
            src = storage.join(self.directory, str(step))
            dst = storage.join(self.directory, f"{step}.corrupt")
            storage.remove(dst)
            if storage.exists(src):
                storage.publish_dir(src, dst)
            logging.warning("checkpoint %d (%s) moved to %s", step, why, dst)
        distributed.barrier(f"lm-ckpt-move-{step}")
        self.manager.reload()

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError if checkpoint `step` holds another model than `abstract_state`;
        any other failure to read the metadata propagates (the checkpoint is unreadable)."""
        saved = self.manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        problem = quantized_mismatch(saved, abstract_state)
        if problem:
            raise CheckpointError(f"checkpoint {step} in {self.directory} {problem}")
        problem = first_mismatch(saved, abstract_state)
        if problem:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not match the configured model: "
                f"{problem}; use a new --workdir or the config it was trained with"
            )

    def restore_latest(
        self, abstract_state: Any, *, with_data: bool = True, rename_corrupt: bool = True
    ) -> tuple[Any, dict | None, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, or None if none.

        Raises CheckpointError when a checkpoint holds another model; moves unreadable ones
        aside to `<step>.corrupt` with a warning and tries the next older one."""
        for step in reversed(self.steps()):
            restored, error = None, None
            try:
                self.check_shapes(step, abstract_state)
                restored = self.restore(step, abstract_state, with_data=with_data)
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                error = e
            # Every host decides the same way before any renames the step.
            if not distributed.any_process(error is not None):
                return (*restored, step)
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            logging.warning(
                "checkpoint %d in %s is unreadable (%s: %s); skipping it",
                step,
                self.directory,
                type(error).__name__ if error else "on another host",
                first_line if error else "",
            )
            if rename_corrupt:
                self._move_aside(step, "unreadable")
        return None

    def restore(
        self, step: int, abstract_state: Any, *, with_data: bool = True
    ) -> tuple[Any, dict | None]:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        state = self.manager.restore(step, args=args)["state"]
        return state, self.restore_data(step) if with_data else None

    def restore_data(self, step: int) -> dict:
        """This host's data-iterator state at `step`."""
        path = self._data_path(step)
        if not storage.exists(path):
            found = storage.listdir(storage.join(self.directory, DATA_DIR, str(step)))
            raise CheckpointError(
                f"checkpoint {step} has no data state for process {jax.process_index()} of "
                f"{jax.process_count()} (it has {found or 'none'}); resume with the process "
                "count it was saved with"
            )
        return json.loads(storage.read_text(path))

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
