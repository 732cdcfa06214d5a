"""torchrun on a CUDA machine: the process-group backend follows ``--device``.

On a GPU ``featlab.distributed.init`` joins ``cpu:gloo,cuda:nccl``: barriers and object
collectives stay on the host, so ranks that share a GPU can extract together; ``--device cpu``
gets plain gloo, so CPU training under torchrun works on a GPU node (NCCL refuses CPU tensors);
DDP, which NCCL cannot run with two ranks on one GPU, is refused before it starts.

Skipped without CUDA (CI has none); run on a GPU machine with ``pytest tests/integration/
test_torchrun_cuda.py``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import featlab
import featlab.testing as ft
from featlab.models import BackboneSpec

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.slow]

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)
N = 30  # shards of 15: batches of 4, 4, 4, 3


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node=2",
           f"--master_port={port}", "-m", "featlab", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_two_ranks_extract_on_the_gpu_even_when_they_share_it(tmp_path):
    out = tmp_path / "c.h5"
    done = torchrun(["extract", "--model", "resnet18", "--weights", "none",
                     "--data", "shapes", "--input-size", "32",
                     "--points", "stages", "--limit", str(N), "--batch-size", "4",
                     "--dtype", "float32", "--device", "cuda", "--workers", "0", "--quiet",
                     "--json", "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["written"] == N
    model, _ = featlab.get_backbone("resnet18", weights="none")
    ds = featlab.load_dataset("shapes", "val", size=32, length=N)
    one = featlab.extract(model, ds, "stages", tmp_path / "one.h5", batch_size=4,
                          dtype="float32", device="cuda", num_workers=0, progress=False)
    with featlab.open_cache(out) as sharded, featlab.open_cache(one.path) as single:
        assert sharded.world_size == 2 and sharded.complete
        assert list(sharded.ids) == list(single.ids)
        for name in single.point_names:
            a, b = sharded[name][:], single[name][:]
            # the shards' batches start elsewhere: cuDNN may pick other kernels, not other values
            assert np.linalg.norm(a - b) <= 1e-3 * np.linalg.norm(b), name


def _caches(tmp_path):
    for split, n in (("train", 32), ("val", 16)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(), ds, "all", tmp_path / f"{split}.h5", spec=SPEC,
                        batch_size=16, dtype="float32", device="cpu", num_workers=0,
                        progress=False)
    return ["train-head", "--train", str(tmp_path / "train.h5"), "--val",
            str(tmp_path / "val.h5"), "--skip", "layer1.0", "--epochs", "2", "--batch-size", "8",
            "--json", "-q"]


def test_cpu_training_under_torchrun_on_a_gpu_node(tmp_path):
    done = torchrun(_caches(tmp_path) + ["--device", "cpu", "--out", str(tmp_path / "cpu")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["world_size"] == 2


def test_ddp_on_gpus_runs_with_one_gpu_per_rank_and_refuses_a_shared_one(tmp_path):
    done = torchrun(_caches(tmp_path) + ["--device", "cuda", "--out", str(tmp_path / "gpu")])
    if torch.cuda.device_count() >= 2:
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads(done.stdout)["world_size"] == 2
    else:
        assert done.returncode != 0
        assert ("featlab train-head: error: each process of a distributed training run must "
                "have a GPU of its own; ranks 0 and 1 both use cuda:0") in done.stderr, \
            done.stderr[-3000:]
