"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import logging
import os

import pytest


@pytest.fixture
def cli_state(monkeypatch):
    """cli.main configures the "featlab" logger and FEATLAB_PROGRESS: undo that afterwards."""
    log = logging.getLogger("featlab")
    saved = (list(log.handlers), log.level, log.propagate)
    monkeypatch.setenv("FEATLAB_PROGRESS", os.environ.get("FEATLAB_PROGRESS", "1"))
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]
