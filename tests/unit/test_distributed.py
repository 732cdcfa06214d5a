"""featlab.distributed: the torchrun job layout, shards, devices and the process-group backend.

Real process groups are exercised by the integration tests (two gloo processes extracting and
training; on a CUDA machine, `test_torchrun_cuda.py`); here the decisions that pick devices and
backends are checked without one.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from featlab import distributed
from featlab.errors import ConfigError


def test_shard_ranges_are_disjoint_contiguous_and_cover_the_sorted_order():
    for n in (0, 1, 5, 17, 100):
        for k in (1, 2, 3, 8):
            parts = [distributed.shard_range(n, r, k) for r in range(k)]
            assert [i for p in parts for i in p] == list(range(n))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1
    with pytest.raises(ConfigError):
        distributed.shard_range(10, 2, 2)


def test_dist_info_from_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    info = distributed.info_from_env(env)
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size) == (5, 8, 1, 4)
    assert not info.is_main and distributed.info_from_env({}).is_main
    assert distributed.DistInfo.from_dict(info.to_dict()) == info
    with pytest.raises(ConfigError, match="RANK must be an integer"):
        distributed.info_from_env({"RANK": "x"})
    with pytest.raises(ConfigError, match="ranks must lie in"):
        distributed.info_from_env({"RANK": "3", "WORLD_SIZE": "2"})
    for bad in ("0", "-5", "soon", "inf"):
        with pytest.raises(ConfigError, match="FEATLAB_DIST_TIMEOUT must be a positive number"):
            distributed.timeout_seconds({"FEATLAB_DIST_TIMEOUT": bad})
    with pytest.raises(ConfigError, match="LOCAL_RANK must be set when WORLD_SIZE is 2"):
        distributed.info_from_env({"RANK": "1", "WORLD_SIZE": "2"})  # e.g. a bare srun
    assert distributed.init().world_size == 1 or distributed.is_distributed()


@pytest.fixture
def two_gpus(monkeypatch):
    """A machine that says it has two CUDA devices (nothing is placed on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_resolve_device_gives_each_rank_its_own_gpu(two_gpus):
    third = distributed.DistInfo(rank=3, world_size=4, local_rank=3, local_world_size=4)
    assert distributed.resolve_device(None, third) == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda", third) == torch.device("cuda", 1)
    assert distributed.resolve_device(torch.device("cuda"), third) == torch.device("cuda", 1)
    assert distributed.resolve_device("cuda:0", third) == torch.device("cuda", 0)
    assert distributed.resolve_device("cpu", third) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"one of this machine's GPUs, cuda:0 \.\. cuda:1; "
                                          r"got 'cuda:2'"):
        distributed.resolve_device("cuda:2", third)


def test_resolve_device_refuses_what_is_not_there(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed.resolve_device(None) == torch.device("cpu")
    with pytest.raises(ConfigError, match="sees no CUDA device. Fix: use --device cpu"):
        distributed.resolve_device("cuda")
    # a dry run plans a GPU run on a machine without one
    assert distributed.resolve_device("cuda:1", require=False) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match="must be cpu, cuda or cuda:N; got 'gpu0'"):
        distributed.resolve_device("gpu0")
    with pytest.raises(ConfigError, match="got 'mps'. Fix: --device cpu"):
        distributed.resolve_device("mps")  # its float64 statistics would fail later


@pytest.mark.parametrize("nccl", [True, False])
def test_backend_keeps_host_collectives_off_the_gpu(monkeypatch, nccl):
    monkeypatch.setattr(dist, "is_nccl_available", lambda: nccl)
    # --device cpu on a GPU node: gloo only, so DDP and the confusion matrix's all_reduce on CPU
    # tensors work (NCCL would refuse them)
    assert distributed.backend_for("cpu") == "gloo"
    backend = distributed.backend_for(torch.device("cuda", 1))
    assert backend == ("cpu:gloo,cuda:nccl" if nccl else "gloo")
    # what torch makes of it: host tensors (barriers, object collectives) go through gloo
    routes = dist.distributed_c10d.BackendConfig(dist.Backend(backend)).get_device_backend_map()
    assert routes["cpu"] == "gloo" and routes["cuda"] == ("nccl" if nccl else "gloo")


def test_shared_gpus_are_refused_on_every_rank_before_ddp(monkeypatch):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("Props", (), {"uuid": f"GPU-{i}"})())
    places = [("node-a", "GPU-0", 0), ("node-a", "GPU-1", 1), ("node-b", "GPU-0", 0),
              ("node-a", "GPU-1", 1)]
    monkeypatch.setattr(distributed, "all_gather_object", lambda mine: places)
    with pytest.raises(ConfigError, match=r"ranks 1 and 3 both use cuda:1 on node-a\. Fix: start "
                                          r"at most as many processes per node as it has GPUs"):
        distributed.require_own_gpus("cuda:1")
    places[3] = ("node-b", "GPU-1", 1)  # the same index on another node is another GPU
    distributed.require_own_gpus("cuda:1")
    # each rank sees only its own GPU, as cuda:0: told apart by the UUID
    places[:] = [("node-a", "GPU-aaa", 0), ("node-a", "GPU-bbb", 0)]
    distributed.require_own_gpus("cuda:0")
    distributed.require_own_gpus("cpu")  # CPU ranks share cores, not devices
