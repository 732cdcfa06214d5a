"""`featlab extract` killed by SIGKILL at random moments resumes to an uninterrupted run's cache."""

from __future__ import annotations

import glob
import json
import os
import random
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import featlab
from featlab.cache.reader import open_cache
from featlab.cache.writer import extract
from featlab.data import load_dataset

N = 96
CMD = [sys.executable, "-m", "featlab", "extract", "--model", "resnet18", "--weights", "none",
       "--data", "shapes",
       "--input-size", "32", "--points", "stages", "--limit", str(N), "--batch-size", "4",
       "--dtype", "float32", "--workers", "0", "--quiet"]  # float32: no rounding hides a change
# one thread: the same arithmetic in every run (and no thread contention on a busy machine)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}


def contents(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...])
                     if isinstance(obj, h5py.Dataset) else None)
        return out, json.loads(f.attrs["settings"]), bool(f.attrs["complete"])


def written(partial):
    if not os.path.exists(partial):
        return None
    # featlab's reader, as a user polls a cache being written (only flagged rows count)
    with open_cache(partial) as cache:
        return len(cache)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_rerun_equals_an_uninterrupted_run(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' arithmetic (OMP_NUM_THREADS=1)
    try:
        model, spec = featlab.get_backbone("resnet18")
        ds = load_dataset("shapes", "val", size=32)
        reference = extract(model, ds, "stages", tmp_path / "ref.h5", spec=spec, batch_size=4,
                            dtype="float32", limit=N, num_workers=0, progress=False)
    finally:
        torch.set_num_threads(threads)
    streaming = reference.seconds  # a subprocess spends about this long after creating the file

    out = tmp_path / "c.h5"
    partial = str(out) + ".partial"
    rng = random.Random(20240611)
    seen = []
    for attempt in range(8):  # until three kills landed while rows were streaming
        before = written(partial) or 0
        proc = subprocess.Popen(CMD + ["--out", str(out)], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        if attempt == 0:  # early: while the file is made, or during the first batches
            while not glob.glob(partial + "*") and proc.poll() is None:
                time.sleep(0.002)
            time.sleep(rng.uniform(0, streaming / 4))
        else:  # once this run has added rows, anywhere in the rest of it
            while (written(partial) or 0) <= before and proc.poll() is None:
                time.sleep(0.005)
            time.sleep(rng.uniform(0, streaming))
        proc.kill()
        proc.wait()
        if out.exists():  # it finished before the kill: that was an uninterrupted run
            out.unlink()
            continue
        seen.append(written(partial))
        if sum(0 < (w or 0) < N for w in seen) >= 3:
            break
    # kills landed while rows were streaming, so something was really resumed
    assert sum(0 < (w or 0) < N for w in seen) >= 3, seen
    done = subprocess.run(CMD + ["--out", str(out), "--json"], env=ENV, capture_output=True,
                          text=True, check=True)
    result = json.loads(done.stdout)
    assert result["skipped"] == seen[-1] and result["written"] == N - seen[-1]
    got, got_settings, complete = contents(out)
    expected, expected_settings, _ = contents(reference.path)
    assert complete and got_settings == expected_settings
    assert got.keys() == expected.keys()
    for name in expected:  # ids, labels, every point, the statistics: bit for bit
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "ref.h5"]
