"""`torchrun --nproc_per_node=2 -m featlab extract` (gloo, CPU) writes one cache in two shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import featlab
from featlab.cache.writer import extract
from featlab.data import load_dataset

N = 30  # not a multiple of 2 x batch size: the shards get 15 samples each, batches of 4 + 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"max_channels": 100, "compression": "gzip"}],
                         ids=["plain", "channel-subsets-gzip"])
def test_two_processes_write_shards_read_as_one_cache_equal_to_one_process(tmp_path, options):
    out = tmp_path / "c.h5"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "featlab",
           "extract", "--model", "resnet18", "--data", "shapes", "--input-size", "32",
           "--points", "stages", "--limit", str(N), "--batch-size", "4", "--workers", "0",
           "--quiet", "--json", "--out", str(out)]
    cmd += [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)  # printed by rank 0 only
    assert (result["num_samples"], result["written"], result["skipped"]) == (N, N, 0)

    model, spec = featlab.get_backbone("resnet18")
    ds = load_dataset("shapes", "val", size=32)
    single = extract(model, ds, "stages", tmp_path / "single.h5", spec=spec, batch_size=4,
                     limit=N, num_workers=0, progress=False, **options)
    shards = sorted(p.name for p in (tmp_path / "c.h5.shards").iterdir())
    assert shards == ["rank-0-of-2.h5", "rank-1-of-2.h5"]
    with h5py.File(out, "r") as f, h5py.File(single.path, "r") as g:  # plain h5py, one file
        assert f["points/layer2.1"].is_virtual and f.attrs["world_size"] == 2
        assert bool(f.attrs["complete"]) and f.attrs["num_samples"] == N
        ids = [i.decode() for i in f["ids"][:]]
        assert ids == ds.ids[:N] and len(set(ids)) == N  # every sample exactly once, in order
        assert f["index"][:].tolist() == list(range(N)) and f["written"][:].all()
        assert json.loads(f.attrs["settings"])["world_size"] == 2
        np.testing.assert_array_equal(f["labels"][:], g["labels"][:])
        for name in g["points"]:
            np.testing.assert_allclose(f[f"points/{name}"][:].astype(np.float32),
                                       g[f"points/{name}"][:].astype(np.float32),
                                       rtol=1e-2, atol=1e-3, err_msg=name)
        np.testing.assert_array_equal(f["stats/nonfinite"][:], g["stats/nonfinite"][:])
        # channel subsets: each shard keeps the same channels, and the virtual file says which
        assert ("channels" in f["points/layer4.1"].attrs) == bool(options)
        if options:
            assert f["points/layer4.1"].attrs["channels"] == g["points/layer4.1"].attrs["channels"]
    with h5py.File(tmp_path / "c.h5.shards" / "rank-0-of-2.h5", "r") as f:
        assert f["points/layer4.1"].compression == options.get("compression")
    with h5py.File(tmp_path / "c.h5.shards" / "rank-1-of-2.h5", "r") as f:
        assert json.loads(f.attrs["shard"]) == {"rank": 1, "world_size": 2, "start": 15,
                                                "stop": N}
        assert f["index"][:].tolist() == list(range(15, N))
    # the cache and its shards move together: the virtual sources are relative paths
    moved = tmp_path / "moved"
    moved.mkdir()
    (tmp_path / "c.h5").rename(moved / "c.h5")
    (tmp_path / "c.h5.shards").rename(moved / "c.h5.shards")
    from featlab.cache.reader import open_cache

    with open_cache(moved / "c.h5") as cache:
        assert len(cache) == N and cache.ids == ds.ids[:N]
