"""What stops a run early: preemption signals (agreed on by every host) and the spike guard
giving up after too many skipped updates in a row."""

from __future__ import annotations

import signal

import numpy as np

from lm import distributed
from lm.errors import LMError


class Preempted(Exception):
    """Raised after the state was saved because SIGTERM/SIGINT arrived (on any host)."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


class Diverged(LMError):
    """Too many consecutive updates were skipped by the loss-spike / NaN guard."""


class StopRequests:
    """Records SIGTERM/SIGINT while installed (a context manager); `agreed()` tells every host
    whether any host got one, so all of them save the same step and stop together."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict = {}

    def _on_signal(self, signum, _frame) -> None:
        self.received.append(signum)

    def __enter__(self) -> StopRequests:
        self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def agreed(self) -> bool:
        """True on every host if any host received a signal; a collective on pods."""
        return distributed.any_process(bool(self.received))

    @property
    def signum(self) -> int:
        """The signal to exit with: this host's, or SIGTERM when another host got it."""
        return self.received[0] if self.received else int(signal.SIGTERM)


class SkipGuard:
    """Counts consecutive skipped updates from each call's `skipped` metric ([] or [steps])."""

    def __init__(self, limit: int):
        self.limit, self.run = limit, 0

    def update(self, skipped, step: int) -> None:
        flags = np.asarray(skipped).reshape(-1) > 0
        if flags.all():
            self.run += flags.size
        else:
            self.run = int(np.argmin(flags[::-1])) if flags.any() else 0
        if self.limit > 0 and self.run >= self.limit:
            raise Diverged(
                f"{self.run} consecutive updates skipped up to step {step} (loss spike or not "
                f"finite; optim.max_consecutive_skips={self.limit}): lower optim.lr, raise "
                "optim.spike_factor (0 turns the guard off) or resume from an older checkpoint"
            )
