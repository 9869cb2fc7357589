"""Orbax checkpoints of the train state and the data-iterator state, saved together.

Saves are asynchronous and only finalized checkpoints are listed, so a run killed mid-save
leaves a temporary directory that is never loaded. A checkpoint that fails to restore (corrupt
or truncated files) is skipped with a warning and the next older one is tried.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import orbax.checkpoint as ocp


class Checkpointer:
    """`<workdir>/checkpoints/<step>/{state,data}`; keeps the newest `keep` checkpoints."""

    def __init__(self, directory: str, *, keep: int, every: int, async_save: bool = True):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(1, every),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data")
        )

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Starts saving `state` and `data_state` as checkpoint `step`; True if a save began."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
        )
        return self.manager.save(step, args=args, force=force)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict, int] | None:
        """(state, data_state, step) from the newest readable checkpoint, or None if none."""
        for step in reversed(self.steps()):
            try:
                restored = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped
                first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                logging.warning(
                    "checkpoint %d in %s is unreadable (%s: %s); skipping it",
                    step,
                    self.directory,
                    type(e).__name__,
                    first_line,
                )
                continue
            return (*restored, step)
        return None

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
        )
        restored = self.manager.restore(step, args=args)
        return restored["state"], restored["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
