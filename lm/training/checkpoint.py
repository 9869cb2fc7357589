"""Orbax checkpoints of the train state, with each host's data-iterator state beside them.

`<dir>/<step>/state` is an orbax checkpoint (every host writes its shards; saves are
asynchronous and only finalized steps are listed, so a run killed mid-save leaves a temporary
directory that is never loaded). `<dir>/data/<step>/process_<i>-of-<n>.json` is host i's
`data_iter.get_state()`, written by that host before the state save starts, so every host
restores its own position in its own shard of the data.

Once a save is written, `<step>/checksums.json` records the size and CRC32C of each of its
files (lm/training/checksums.py); a restore verifies them before reading, so a flipped bit is
caught instead of silently changing the weights (checkpoints from before have none and are not
verified). Restoring then checks the tree and shapes against the configured model: a mismatch
is a `CheckpointError` naming the first differing parameter (nothing is skipped or deleted).
A checkpoint whose files cannot be read (changed, truncated, garbled, missing its data state)
is renamed to `<step>.corrupt` with a warning and the next older one is tried; if none is
left, that is a one-line error rather than a silent restart from step 0.

A save that fails (a full disk) is one `CheckpointError` line naming the step, raised before
anything is written when the disk visibly cannot hold it, else when the asynchronous write's
failure is known (the next save, `wait` or `close`); checkpoints saved before stay intact.
The data states of steps orbax has deleted are removed once each save has finished.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from lm import distributed, jsonio, storage
from lm.errors import CheckpointError, LMError
from lm.training import checksums, orbax_noise
from lm.training.ckpt_tree import _key_name, _shapes, first_mismatch, quantized_mismatch

__all__ = ["Checkpointer", "CorruptCheckpoint", "_key_name", "first_mismatch"]

DATA_DIR = "data"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's name for a step being written on a local disk
# How a failed write shows up: OSError (a full disk), tensorstore's ValueError, orbax's
# RuntimeError / TimeoutError from its save threads.
SAVE_ERRORS = (OSError, ValueError, RuntimeError, TimeoutError)


class CorruptCheckpoint(LMError):
    """A checkpoint whose files cannot be used as written (a changed byte, a missing or
    garbled file): a restore skips it and tries the next older one. Not a CheckpointError,
    which callers re-raise as "this checkpoint holds another model"; a user error all the
    same (one line) where a command asked for that very checkpoint."""

    def __init__(self, step: int, directory: str, detail: str):
        super().__init__(f"checkpoint {step} in {directory} is unreadable: {detail}")
        self.detail = detail


class Checkpointer:
    """`<directory>/<step>/state` + per-host data states; keeps the newest `keep` checkpoints.

    `every` is kept for callers; the trainer decides which steps to save. A step is saved at
    most once per run (a second `save` of the same step is a no-op). A save that fails (a full
    disk) raises a one-line CheckpointError naming it at the latest when the next save, `wait`
    or `close` runs; every checkpoint saved before it stays as it was.
    """

    def __init__(self, directory: str, *, keep: int, every: int = 1, async_save: bool = True):
        del every
        orbax_noise.install()
        self.directory = storage.absolute(directory)
        self.async_save = async_save
        # Checksums are recorded by the primary host once the asynchronous save has finalized
        # its files, before orbax commits the step (so a committed step always has them).
        callback = ocp.AsyncOptions(post_finalization_callback=self._record_writing)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            enable_async_checkpointing=async_save,
            create=True,
            async_options=callback if async_save else None,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler()},
        )
        self._saved: set[int] = set()
        self._writing: int | None = None  # the step whose asynchronous save is in flight
        self._failed = False
        self._verified: set[int] = set()

    def _data_path(self, step: int, index: int | None = None, count: int | None = None) -> str:
        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
        return storage.join(self.directory, DATA_DIR, str(step), f"process_{index}-of-{count}.json")

    def _step_dir(self, step: int) -> str:
        return storage.join(self.directory, str(step))

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = True) -> bool:
        """Starts saving checkpoint `step`; False (and nothing written) if this run saved it.

        Every host must call it with the same step (orbax saves are collective). Raises a
        one-line CheckpointError if the previous save failed or this one cannot fit."""
        del force
        if step in self._saved:
            return False
        self._finish_pending()
        if step in self.manager.all_steps():
            self._move_aside(step, "superseded")  # an older run's copy of this step
        self._check_space(step)
        self._writing = step
        try:
            storage.write_text(self._data_path(step), json.dumps(data_state))
            self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))
            if not self.async_save:
                self._record_writing()
        except SAVE_ERRORS as e:  # one line naming the step, not a traceback per thread
            self._writing = None
            raise self._save_failed(step, e) from None
        self._saved.add(step)
        if not self.async_save:
            self._writing = None
            self._prune_data()
        return True

    def _record_writing(self) -> None:
        """Records the checksums of the step being written (primary host, orbax's finalize
        thread for asynchronous saves): in orbax's temporary directory on a local disk, in
        the step's own directory in a bucket (orbax commits there by a marker file)."""
        step = self._writing
        if step is None or jax.process_index():
            return
        tmp = storage.join(self.directory, f"{step}{TMP_SUFFIX}")
        step_dir = tmp if storage.exists(tmp) else self._step_dir(step)
        data_dir = storage.join(self.directory, DATA_DIR, str(step))
        names = storage.listdir(data_dir)
        checksums.record(step_dir, {n: storage.join(data_dir, n) for n in names})

    def _finish_pending(self) -> None:
        """Waits for the save in flight; a failure becomes one CheckpointError line."""
        step = self._writing
        if step is None:
            return
        try:
            self.manager.wait_until_finished()
        except SAVE_ERRORS as e:
            raise self._save_failed(step, e) from None
        finally:
            self._writing = None
        self._prune_data()

    def _save_failed(self, step: int, error: Exception) -> CheckpointError:
        """The one-line error of a failed save of `step`, after removing its partial files."""
        self._failed = True
        orbax_noise.take_suppressed()  # orbax's per-thread reports of this very failure
        self._saved.discard(step)
        if jax.process_index() == 0:
            storage.remove(storage.join(self.directory, f"{step}{TMP_SUFFIX}"))
            storage.remove(storage.join(self.directory, DATA_DIR, str(step)))
        intact = [s for s in self._steps_on_disk() if s != step]
        after = (
            f"checkpoint {intact[-1]} and older are intact; free space (or fix the storage) and "
            f"re-run to resume from checkpoint {intact[-1]}"
            if intact
            else "free space (or fix the storage) and re-run"
        )
        return CheckpointError(
            f"checkpoint {step} could not be saved in {self.directory} ({_reason(error)}); {after}"
        )

    def _check_space(self, step: int) -> None:
        """Refuses, before writing anything, a save that cannot fit on a local disk: one needs
        about the size of the newest checkpoint (same arrays, similar compression; 10% slack).
        Without one there is no estimate (orbax compresses), and a write that fails says so
        later. Every host agrees, so all stop at this save."""
        short = None
        steps = self._steps_on_disk()
        if steps and not storage.is_remote(self.directory):
            need = _tree_bytes(self._step_dir(steps[-1]))
            free = shutil.disk_usage(self.directory).free
            if free < 0.9 * need:
                short = (
                    f"no space left on device: {_size(free)} free, checkpoint {steps[-1]} "
                    f"took {_size(need)}"
                )
        if distributed.any_process(short is not None):
            raise self._save_failed(step, OSError(short or "no space left on another host"))

    def _steps_on_disk(self) -> list[int]:
        return sorted(int(n) for n in storage.listdir(self.directory) if n.isdigit())

    def _prune_data(self) -> None:
        """Removes the data states of steps whose checkpoint is gone (orbax deletes old steps
        when a later save finalizes, so this runs after each save is known to be done)."""
        if jax.process_index():
            return
        keep = {str(s) for s in self._steps_on_disk()}
        if self._writing is not None:
            keep.add(str(self._writing))
        for name in storage.listdir(storage.join(self.directory, DATA_DIR)):
            if name.isdigit() and name not in keep:
                storage.remove(storage.join(self.directory, DATA_DIR, name))

    def _move_aside(self, step: int, why: str) -> None:
        """Renames `<step>` to `<step>.corrupt` (primary host), so orbax no longer lists it."""
        self.manager.wait_until_finished()
        self._saved.discard(step)
        self._verified.discard(step)
        if jax.process_index() == 0:
            src = self._step_dir(step)
            dst = storage.join(self.directory, f"{step}.corrupt")
            storage.remove(dst)
            if storage.exists(src):
                storage.publish_dir(src, dst)
            logging.warning("checkpoint %d (%s) moved to %s", step, why, dst)
        distributed.barrier(f"lm-ckpt-move-{step}")
        self.manager.reload()

    # -- restoring -------------------------------------------------------------------------

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def verify(self, step: int) -> None:
        """Raises CorruptCheckpoint if a file of checkpoint `step` differs from the checksums
        recorded when it was written (the primary host checks the state's files, every host
        its own data state). A checkpoint written before checksums existed is not checked."""
        if step in self._verified:
            return
        step_dir = self._step_dir(step)
        try:
            sums = checksums.load(step_dir)
            if sums is not None:
                data = self._data_path(step)
                own = {storage.path(data).name: data}
                checksums.verify(
                    step_dir, sums if jax.process_index() == 0 else _no_files(sums), own
                )
        except checksums.ChecksumMismatch as e:
            raise CorruptCheckpoint(step, self.directory, str(e)) from None
        self._verified.add(step)

    def check_shapes(self, step: int, abstract_state: Any) -> None:
        """Raises CheckpointError if checkpoint `step` holds another model than `abstract_state`
        (CorruptCheckpoint if its files are damaged); any other failure to read the metadata
        propagates (the checkpoint is unreadable)."""
        self.verify(step)
        saved = self.manager.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)
        if saved is None or not _shapes(saved):
            raise CorruptCheckpoint(step, self.directory, "its array metadata is missing")
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
        """(state, data_state, step) from the newest readable checkpoint, or None if there is
        none at all.

        Raises CheckpointError when a checkpoint holds another model, was saved by another
        process count, or when every checkpoint was unreadable (they are moved aside, so a
        re-run starts afresh). Moves unreadable ones aside to `<step>.corrupt` with a warning
        and tries the next older one."""
        tried = self.steps()
        for step in reversed(tried):
            restored, error = None, None
            try:
                data = self.restore_data(step) if with_data else None  # cheap: first
                self.check_shapes(step, abstract_state)  # verifies the checksums first
                restored = (self.restore(step, abstract_state, with_data=False)[0], data)
            except CorruptCheckpoint as e:
                error = e
            except CheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                error = e
            # Every host decides the same way before any renames the step.
            if not distributed.any_process(error is not None):
                return (*restored, step)
            logging.warning(
                "checkpoint %d in %s is unreadable (%s); skipping it",
                step,
                self.directory,
                _reason(error) if error else "on another host",
            )
            orbax_noise.take_suppressed()  # orbax's reports of this very failure
            if rename_corrupt:
                self._move_aside(step, "unreadable")
        if tried and rename_corrupt:
            raise CheckpointError(
                f"every checkpoint in {self.directory} was unreadable (steps "
                f"{', '.join(map(str, tried))}) and was moved to <step>.corrupt; re-running "
                "starts from step 0"
            )
        return None

    def restore(
        self, step: int, abstract_state: Any, *, with_data: bool = True
    ) -> tuple[Any, dict | None]:
        """Checkpoint `step` (its files verified first), and this host's data state."""
        data = self.restore_data(step) if with_data else None
        self.verify(step)
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        state = self.manager.restore(step, args=args)["state"]
        return state, data

    def restore_data(self, step: int) -> dict:
        """This host's data-iterator state at `step`. Missing while the step has data states
        of another process count: a CheckpointError (resume with that count); missing
        otherwise: CorruptCheckpoint (an older checkpoint is used)."""
        path = self._data_path(step)
        name = storage.path(path).name
        if not storage.exists(path):
            found = storage.listdir(storage.join(self.directory, DATA_DIR, str(step)))
            count = jax.process_count()
            others = [n for n in found if n.startswith("process_") and f"-of-{count}." not in n]
            if others and len(others) == len(found):
                raise CheckpointError(
                    f"checkpoint {step} in {self.directory} was saved by another number of "
                    f"processes ({', '.join(others)}; this run has {count}); resume with the "
                    "process count it was saved with"
                )
            raise CorruptCheckpoint(
                step, self.directory, f"its data state {DATA_DIR}/{step}/{name} is missing"
            )
        try:
            return jsonio.loads(storage.read_bytes(path))
        except ValueError as e:
            raise CorruptCheckpoint(
                step, self.directory, f"{DATA_DIR}/{step}/{name}: {e}"
            ) from None

    def wait(self) -> None:
        """Blocks until the save in flight is written (a failure raises CheckpointError)."""
        self._finish_pending()

    def close(self) -> None:
        """Finishes the save in flight (a failure raises CheckpointError) and closes orbax.
        Orbax errors that were dropped (lm/training/orbax_noise.py) but led to no failure
        reported here are summed up in one warning."""
        try:
            self._finish_pending()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - the failed save was reported above
                if not self._failed:
                    raise
            dropped = orbax_noise.take_suppressed()
            if dropped and not self._failed:
                logging.warning(
                    "orbax reported %d error(s); the first: %s", len(dropped), dropped[0]
                )


def _no_files(sums: dict) -> dict:
    """`sums` with only the data states: a non-primary host checks its own data state."""
    return {**sums, "files": {}}


def _reason(error: BaseException) -> str:
    """One short line saying why: a CorruptCheckpoint's detail, "no space left on device" for
    a full disk (tensorstore's message is a paragraph of paths), else the error's first line."""
    if isinstance(error, CorruptCheckpoint):
        return error.detail
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if text.startswith("no space left on device"):
        return text  # _check_space's own, with the sizes
    if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
        return "no space left on device"
    return f"{type(error).__name__}: {text[:200]}"


def _tree_bytes(root: str) -> int:
    """The bytes of every file under a local directory."""
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(root) for n in names)


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"
