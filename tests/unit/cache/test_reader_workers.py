"""The reader in other processes: pickling without HDF5 handles, reopening per process, and
DataLoader workers under spawn (R-13.2) and fork."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from featlab.cache.reader import open_cache


def test_pickle_drops_handles_and_reads_the_same(partial_cache):
    cache = open_cache(partial_cache.path)
    before = cache["layer1.1"][:]  # opens the HDF5 handle
    state = cache.__getstate__()
    assert state["_file"] is None and state["_dsets"] == {} and state["_pid"] is None
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.ids == cache.ids and copy.points == cache.points
    np.testing.assert_array_equal(copy["layer1.1"][:], before)
    ds = pickle.loads(pickle.dumps(cache.dataset("conv1")))
    np.testing.assert_array_equal(ds[1]["conv1"].numpy(), partial_cache.arrays["conv1"][1])


def test_reopens_after_the_process_changes(complete_cache, monkeypatch):
    cache = open_cache(complete_cache.path)
    cache["conv1"][0]
    first = cache._h5()
    assert cache._h5() is first
    monkeypatch.setattr("os.getpid", lambda: -1)  # as in a forked child
    assert cache._h5() is not first and cache._pid == -1
    np.testing.assert_array_equal(cache["conv1"][3], complete_cache.arrays["conv1"][3])


def _check_loader(cache, exp, context, rows):
    ds = cache.dataset(["layer1.0", "layer1.1"], images=True, dtype=torch.float32)
    assert len(ds) == len(rows)
    loader = DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context=context)
    batches = list(loader)
    got = {k: torch.cat([b[k] for b in batches]).numpy()
           for k in ("layer1.0", "layer1.1", "labels", "images", "index", "row")}
    np.testing.assert_array_equal(got["layer1.0"], exp.arrays["layer1.0"][rows])
    np.testing.assert_array_equal(got["layer1.1"], exp.arrays["layer1.1"][rows])
    np.testing.assert_array_equal(got["labels"], exp.labels[rows])
    np.testing.assert_array_equal(got["images"], exp.images[rows])
    np.testing.assert_array_equal(got["index"], exp.index[rows])
    np.testing.assert_array_equal(got["row"], np.arange(len(rows)))
    assert sum((b["id"] for b in batches), []) == [exp.ids[r] for r in rows]
    assert batches[0]["layer1.0"].dtype == torch.float32 and batches[0]["labels"].dtype == \
        torch.uint8


@pytest.mark.slow
def test_dataloader_spawn_two_workers(partial_cache):
    _check_loader(open_cache(partial_cache.path), partial_cache, "spawn", partial_cache.rows)


def test_dataloader_fork_after_reading_in_the_parent(complete_cache):
    cache = open_cache(complete_cache.path)
    cache["layer1.0"][0]  # the parent holds an open handle the children inherit
    _check_loader(cache, complete_cache, "fork", np.arange(12))
