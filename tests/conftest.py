"""Shared fixtures: `gcs`, a GCS emulator on 127.0.0.1 (see gcs_emulator.py)."""

import pytest
from gcs_emulator import emulator_environment, running_emulator


@pytest.fixture(scope="session")
def gcs():
    """A running GCS emulator with one bucket; this process's environment points at it."""
    with running_emulator() as emulator, emulator_environment(emulator):
        yield emulator
