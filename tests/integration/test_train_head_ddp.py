"""`torchrun --nproc_per_node=2 -m featlab train-head` (gloo, CPU) matches one process."""

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
import torch

import featlab
import featlab.testing as ft
from featlab.models import BackboneSpec
from featlab.segment import runs
from featlab.segment.train import train_head

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def caches_of(folder, n_train, n_val, model=None, spec=SPEC, points="all"):
    """``train.h5`` and ``val.h5`` of ``model`` (default TinyResNet) on shapes at 32 px."""
    for split, n in (("train", n_train), ("val", n_val)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(model or ft.TinyResNet(), ds, points, folder / f"{split}.h5", spec=spec,
                        batch_size=16, dtype="float32", num_workers=0, progress=False)
    return folder / "train.h5", folder / "val.h5"


@pytest.mark.slow
def test_two_gloo_processes_match_the_single_process_val_miou(tmp_path):
    train, val = caches_of(tmp_path, 48, 17)  # 17: uneven val shards (8 + 9)
    with h5py.File(train, "r+") as f:  # ranks keep different numbers of pixels per batch
        labels = f["labels"][:]
        labels[::3, :20] = 255
        f["labels"][:] = labels
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "featlab",
           "train-head", "--train", str(train), "--val", str(val), "--skip", "layer1.0",
           "--epochs", "3", "--batch-size", "8", "--lr", "0.01", "--out",
           str(tmp_path / "ddp"), "--json", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ddp = json.loads(done.stdout)  # printed by rank 0 only
    assert ddp["world_size"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train_head(train, val, skip="layer1.0", epochs=3, batch_size=8, lr=0.01,
                            out=tmp_path / "one", progress=False)
    finally:
        torch.set_num_threads(threads)
    # every val pixel counted once, summed over the ranks
    counts = np.asarray(ddp["metrics"]["matrix"])
    assert counts.sum() == np.asarray(single.metrics["matrix"]).sum() == 17 * 32 * 32
    assert abs(ddp["miou"] - single.miou) < 1e-4
    assert runs.read_confusions(tmp_path / "ddp").shape[0] == 17
    losses = [h["loss"] for h in ddp["history"]], [h["loss"] for h in single.history]
    # same global batches, and the gradient of the mean over the global batch's kept pixels
    # (a mean of the ranks' means was 0.6 % off here)
    np.testing.assert_allclose(*losses, rtol=1e-5)


@pytest.mark.slow
def test_two_gloo_processes_fine_tune_a_backbone_whose_classifier_gets_no_gradient(tmp_path):
    # resnet18's avgpool and fc run after the deepest point and give the loss nothing; DDP
    # used to stop on the second step ("parameters that were not used in producing loss")
    model, spec = featlab.get_backbone("resnet18")
    caches_of(tmp_path, 16, 5, model, spec, "stages")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "featlab",
           "train-head", "--train", str(tmp_path / "train.h5"), "--val",
           str(tmp_path / "val.h5"), "--skip", "layer2.1", "--finetune", "--epochs", "2",
           "--batch-size", "4", "--lr", "0.01", "--out", str(tmp_path / "ft"), "--json", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout)
    assert run["world_size"] == 2 and run["epochs_done"] == 2
    assert len(run["history"]) == 2 and all(np.isfinite(h["loss"]) for h in run["history"])
    state = torch.load(tmp_path / "ft" / "checkpoint.pt", weights_only=False)
    start = model.state_dict()
    moved = [k for k, v in state["backbone"].items() if not torch.equal(v, start[k])]
    assert any(k.startswith("layer1.") for k in moved)  # the backbone was trained
    assert not any(k.startswith("fc.") for k in moved)  # the unused classifier was not


@pytest.mark.slow
def test_a_torchrun_sweep_writes_and_prints_once(tmp_path):
    caches_of(tmp_path, 16, 6)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "featlab",
           "sweep", "--train", str(tmp_path / "train.h5"), "--val", str(tmp_path / "val.h5"),
           "--points", "layer1.0", "--seeds", "1", "--epochs", "1", "--batch-size", "4",
           "--out", str(tmp_path / "sweep"), "--json", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}
    for _ in range(2):  # the sweep, then its finished record shown again
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        printed = json.loads(done.stdout)  # one document: rank 0 alone prints
        assert [r["point"] for r in printed["rows"]][-1] == "layer1.0"
    assert (tmp_path / "sweep" / "predictors.json").exists()


NODE_LOCAL = """
import os, sys
from pathlib import Path
from featlab.segment.train import train_head

train, val, base = sys.argv[1:4]
# each "node" sees its own run folder, as when --out lies on node-local scratch
out = Path(base) / f"node{os.environ['RANK']}"
r = train_head(train, val, skip="layer1.0", epochs=1, batch_size=4, lr=0.01, out=out,
               progress=False)
# one write per rank: the two ranks share the pipe, and print() writes piece by piece
os.write(1, f"RESUMED {os.environ['RANK']} {r.resumed_from_epoch}\\n".encode())
"""


@pytest.mark.slow
def test_every_rank_resumes_as_rank_0_decides_when_folders_are_node_local(tmp_path):
    caches_of(tmp_path, 8, 4)
    script = tmp_path / "node_local.py"
    script.write_text(NODE_LOCAL)
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0",
           "FEATLAB_DIST_TIMEOUT": "60"}

    def run():
        cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", str(script),
               str(tmp_path / "train.h5"), str(tmp_path / "val.h5"), str(tmp_path / "runs")]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        return sorted(line for line in done.stdout.splitlines() if line.startswith("RESUMED"))

    assert run() == ["RESUMED 0 0", "RESUMED 1 0"]
    # interrupted after its epoch, as rank 0's node sees it: a checkpoint and no run.json;
    # rank 1's node has nothing (it never writes)
    (tmp_path / "runs" / "node0" / "run.json").unlink()
    assert not (tmp_path / "runs" / "node1" / "checkpoint.pt").exists()
    assert run() == ["RESUMED 0 1", "RESUMED 1 1"]  # rank 1 resumes with rank 0
