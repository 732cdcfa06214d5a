"""While `featlab extract` runs: a reader sees only complete samples and never errors, and a
second extraction into the same cache is refused (the first then stops on SIGTERM)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from featlab.cache.reader import open_cache  # imported before the extraction starts

N = 120
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}


def snapshot_h5py(partial):
    """Plain h5py, as any HDF5 user would: flags first, then the flagged rows."""
    with h5py.File(partial, "r", locking=False) as f:
        rows = np.flatnonzero(f["written"][:])
        return ("h5py", rows, {"layer1.1": f["points/layer1.1"][:][rows],
                               "layer4.1": f["points/layer4.1"][:][rows],
                               "labels": f["labels"][:][rows],
                               "ids": f["ids"][:][rows]})


def snapshot_reader(partial):
    with open_cache(partial) as cache:
        rows = np.asarray(cache.rows)
        return ("open_cache", rows, {"layer1.1": cache["layer1.1"][:],
                                     "layer4.1": cache["layer4.1"][:],
                                     "labels": cache.labels[:],
                                     "ids": np.array([i.encode() for i in cache.ids])})


@pytest.mark.slow
def test_polling_reader_sees_only_complete_rows_equal_to_the_final_values(tmp_path):
    out = tmp_path / "c.h5"
    partial = str(out) + ".partial"
    cmd = [sys.executable, "-m", "featlab", "extract", "--model", "resnet18", "--weights", "none",
           "--data", "shapes",
           "--input-size", "32", "--points", "stages", "--limit", str(N), "--batch-size", "2",
           "--workers", "0", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    snapshots = []
    readers = [snapshot_h5py, snapshot_reader]
    try:
        while proc.poll() is None:
            if not os.path.exists(partial):
                time.sleep(0.01)
                continue
            read = readers[len(snapshots) % 2]
            try:
                snapshots.append(read(partial))
            except Exception:
                if os.path.exists(partial):  # only the rename at the very end may interrupt
                    raise
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stderr.read()
    with h5py.File(out, "r") as f:
        final = {"layer1.1": f["points/layer1.1"][:], "layer4.1": f["points/layer4.1"][:],
                 "labels": f["labels"][:], "ids": f["ids"][:]}
    partial_views = [s for s in snapshots if 0 < len(s[1]) < N]
    assert len(partial_views) >= 4 and {s[0] for s in partial_views} == {"h5py", "open_cache"}
    for kind, rows, values in snapshots:
        for name, value in values.items():
            np.testing.assert_array_equal(value, final[name][rows], err_msg=f"{kind} {name}")


@pytest.mark.slow
def test_a_second_extraction_into_the_same_cache_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "c.h5"
    partial = str(out) + ".partial"
    cmd = [sys.executable, "-m", "featlab", "extract", "--model", "resnet18", "--weights", "none",
           "--data", "shapes", "--split", "train", "--input-size", "64", "--points", "stages",
           "--limit", "5000", "--batch-size", "2", "--workers", "0", "--quiet", "--out", str(out)]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 120
        while first.poll() is None and not os.path.exists(partial) and (
                time.monotonic() < deadline):
            time.sleep(0.01)
        for extra in ([], ["--force"]):  # resuming, or starting over, under the first run
            second = subprocess.run(cmd + extra, env=ENV, capture_output=True, text=True,
                                    timeout=120)
            assert second.returncode == 2, second.stderr
            assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
            assert (f"{out} must be written by one extraction at a time; another process is "
                    f"writing it (pid {first.pid} on ") in second.stderr
        assert first.poll() is None, "the first run ended before the second was refused"
        first.terminate()  # SIGTERM, as a scheduler cancelling the job: stopped as Ctrl-C is
        assert first.wait(timeout=60) == 143
        assert first.stderr.read() == ("featlab extract: terminated; the same command resumes "
                                       "where it stopped\n")
    finally:
        first.kill()
        first.wait(timeout=60)
    assert sorted(os.listdir(tmp_path)) == ["c.h5.partial"]  # its lock is gone with it
    # the refused runs left the first one's partial cache as it was writing it: whole rows
    with open_cache(partial) as cache:
        rows = len(cache.rows)
    checked = subprocess.run([sys.executable, "-m", "featlab", "verify", partial], env=ENV,
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0 and rows > 0, checked.stdout + checked.stderr
