"""The ``featlab`` console script as a process of its own (what shells and pipes see)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FEATLAB = str(Path(sys.executable).with_name("featlab"))


def test_a_reader_that_stops_early_is_no_error():
    # `featlab points resnet50 | head -1`: the pipe closes while featlab still prints
    done = subprocess.Popen([FEATLAB, "points", "resnet50", "--input-size", "64"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done.stdout.close()  # the reader is gone before the first line
    err = done.stderr.read().decode()
    assert done.wait(timeout=120) == 141  # as a shell reports a process ended by SIGPIPE
    assert err == ""  # no BrokenPipeError traceback


def test_errors_and_warnings_are_one_line_each(tmp_path):
    done = subprocess.run([FEATLAB, "inspect", str(tmp_path / "missing.h5")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("featlab inspect: error:")
