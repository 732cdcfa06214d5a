"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import logging
import os

import pytest
import torch


@pytest.fixture
def cli_state(monkeypatch):
    """cli.main configures the "featlab" logger and FEATLAB_PROGRESS: undo that afterwards."""
    log = logging.getLogger("featlab")
    saved = (list(log.handlers), log.level, log.propagate)
    monkeypatch.setenv("FEATLAB_PROGRESS", os.environ.get("FEATLAB_PROGRESS", "1"))
    yield
    log.handlers[:], log.level, log.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def one_thread():
    """One intra-op thread: the same arithmetic in every run, and no OpenMP stalls when other
    processes load this 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
