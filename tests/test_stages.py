"""lm.stages: live stage lines on a terminal, silence elsewhere, phase timings, and log records
that never land glued onto an open progress line."""

import io
import logging
import time

from lm import stages
from lm.training.progress import ProgressLine


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_stage_draws_a_live_line_on_a_terminal_and_ends_it_with_its_time():
    term = FakeTerminal()
    with stages.stage("packing the data", stream=term, after=0.0) as s:
        s.update(3, 10)
        time.sleep(0.7)  # the ticker redraws every 0.5 s
    out = term.getvalue()
    assert "\r\x1b[2Kpacking the data 3/10 " in out
    assert out.endswith("\n") and "packing the data: " in out.splitlines()[-1]
    name, seconds = stages.timings()[-1]
    assert name == "packing the data" and 0.6 < seconds < 5


def test_a_stage_is_silent_when_not_a_terminal_but_still_timed():
    plain = io.StringIO()
    with stages.stage("quiet phase", stream=plain, after=0.0):
        time.sleep(0.6)
    assert plain.getvalue() == ""
    assert stages.timings()[-1][0] == "quiet phase"


def test_a_short_stage_draws_nothing():
    term = FakeTerminal()
    with stages.stage("quick", stream=term, after=2.0):
        pass
    assert term.getvalue() == ""


def test_a_log_record_starts_on_its_own_line_after_the_progress_line():
    term = FakeTerminal()
    handler = logging.StreamHandler(term)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        stages.break_line_before_logs()
        ProgressLine(total_steps=100, stream=term).show(10, {"loss": 1.5})
        logging.warning("signal 2: saving a checkpoint")
    finally:
        root.removeHandler(handler)
    lines = term.getvalue().split("\n")
    assert lines[0].startswith("\r\x1b[2Kstep  10/100") and "ETA" in lines[0]
    assert lines[1] == "WARNING signal 2: saving a checkpoint"  # not glued onto "ETA ..."


def test_format_seconds():
    assert stages.format_seconds(4.24) == "4.2s"
    assert stages.format_seconds(65) == "1m05s"
    assert stages.format_seconds(7380) == "2h03m"
