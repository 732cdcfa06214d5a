"""The dry-run estimate (pure function and `featlab extract --dry-run`)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torchvision

from featlab import cli
from featlab.cache.plan import ExtractPlan, channel_subset, plan_extract, stored_size
from featlab.errors import ConfigError
from featlab.points import SkipPoint

POINTS = [SkipPoint("layer1", 0, "layer1", 64, (56, 56), 4, 35, 4, 13),
          SkipPoint("layer4", 1, "layer4", 512, (7, 7), 32, 427, 32, 211)]


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: no OpenMP stalls when other processes load this 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_plan_counts_bytes_per_point_and_sample_by_hand():
    plan = plan_extract(POINTS, num_samples=1000, input_size=224, dtype="float16", max_size=14,
                        save_images=True, batch_size=16, id_bytes=20)
    layer1, layer4 = plan.points
    assert (layer1.stored_size, layer1.pooling) == ((14, 14), "area")
    assert (layer4.stored_size, layer4.pooling) == ((7, 7), "none")
    assert layer1.bytes_per_sample == 64 * 14 * 14 * 2
    assert layer4.bytes_per_sample == 512 * 7 * 7 * 2
    assert layer1.total_bytes == 1000 * layer1.bytes_per_sample
    assert plan.label_bytes_per_sample == 224 * 224
    assert plan.image_bytes_per_sample == 3 * 224 * 224
    # id + int64 index + uint8 flag + (int64 count + float32 error) per point
    assert plan.other_bytes_per_sample == 20 + 8 + 1 + 2 * 12
    per_sample = 25088 + 50176 + 50176 + 150528 + 53
    assert plan.bytes_per_sample == per_sample
    assert per_sample * 1000 < plan.total_bytes < per_sample * 1000 + 2**20  # + metadata
    assert ExtractPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_plan_memory_in_flight_does_not_grow_with_n_and_disk_fit():
    small = plan_extract(POINTS, 100, 224, batch_size=8)
    large = plan_extract(POINTS, 10**6, 224, batch_size=8)
    assert small.host_bytes == large.host_bytes
    assert large.total_bytes > 1000 * small.total_bytes
    # the queue holds whole batches: the estimate grows with the batch size
    assert plan_extract(POINTS, 100, 224, batch_size=16).host_bytes > small.host_bytes
    need = small.total_bytes
    assert plan_extract(POINTS, 100, 224, batch_size=8, free_bytes=need).fits
    assert not plan_extract(POINTS, 100, 224, batch_size=8, free_bytes=need - 1).fits
    assert plan_extract(POINTS, 100, 224).fits  # free space unknown


def test_plan_counts_only_the_channels_kept():
    plan = plan_extract(POINTS, 10, 224, dtype="float16", max_channels=100)
    layer1, layer4 = plan.points
    assert (layer1.channels, layer1.stored_channels) == (64, 64)  # under the bound: all
    assert (layer4.channels, layer4.stored_channels) == (512, 100)
    assert layer4.bytes_per_sample == 100 * 7 * 7 * 2 and plan.max_channels == 100
    assert ExtractPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    # the subsets: sorted, distinct, in range, reproducible, per point name and seed
    kept = channel_subset("layer4", 512, 100, seed=0)
    assert len(kept) == 100 and list(kept) == sorted(set(kept)) and kept[-1] < 512
    assert kept == channel_subset("layer4", 512, 100, seed=0)
    assert kept != channel_subset("layer4", 512, 100, seed=1)
    assert kept != channel_subset("layer3", 512, 100, seed=0)
    assert channel_subset("layer4", 512, 512) is None and channel_subset("layer4", 512, 0) is None


def test_plan_puts_the_forward_on_the_device_it_runs_on():
    cpu = plan_extract(POINTS, 100, 224, batch_size=8, weight_bytes=10**6)
    gpu = plan_extract(POINTS, 100, 224, batch_size=8, weight_bytes=10**6, device="cuda")
    # the forward: 3 float32 copies of the widest point, layer1's 64 x 56 x 56, per sample
    forward = 8 * 3 * 4 * 64 * 56 * 56
    # a GPU run holds one more batch on the host (its copies are synchronised one batch late),
    # in pinned buffers that torch's host allocator rounds up to powers of two
    arrays = [p.bytes_per_sample for p in cpu.points] + [224 * 224, 2 * (8 + 4)]
    pinned = sum(2 ** math.ceil(math.log2(8 * b)) for b in arrays)
    assert cpu.host_bytes - gpu.host_bytes == forward + 4 * 8 * sum(arrays) - 5 * pinned
    assert cpu.device_bytes == 0
    # the weights, the forward and the largest stored copy (layer1 in float16) of a batch
    assert gpu.device_bytes == 10**6 + forward + 8 * 64 * 56 * 56 * 2
    assert gpu.weight_bytes == 10**6
    assert ExtractPlan.from_dict(json.loads(json.dumps(gpu.to_dict()))) == gpu


def test_the_forward_is_sized_by_every_layer_it_passes_not_only_the_stored_ones():
    stem = SkipPoint("relu", 0, "relu", 64, (112, 112), 2, 7, 2, 3)
    deep = plan_extract(POINTS[1:], 100, 224, batch_size=8, device="cuda")
    passed = plan_extract(POINTS[1:], 100, 224, batch_size=8, device="cuda",
                          forward_points=[stem, *POINTS])
    # storing layer4 alone still runs the stem: its 64 x 112 x 112 float32 maps, 3 alive
    assert passed.device_bytes - deep.device_bytes == 8 * 3 * 4 * (64 * 112 * 112 - 512 * 7 * 7)
    assert passed.total_bytes == deep.total_bytes


def test_stored_size_keeps_the_aspect_and_never_grows():
    assert stored_size((56, 56), 14) == (14, 14)
    assert stored_size((64, 32), 16) == (16, 8)
    assert stored_size((7, 7), 14) == (7, 7)
    assert stored_size((100, 3), 10) == (10, 1)
    assert stored_size((33, 33), None) == (33, 33)
    with pytest.raises(ConfigError, match=r"`max_size` \(--max-size\) must be an int >= 0"):
        plan_extract(POINTS, 10, 224, max_size=-1)


def test_cli_dry_run_plans_a_gpu_run_without_a_gpu(tmp_path, capsys, cli_state):
    argv = ["extract", "--model", "resnet18", "--weights", "none",
            "--data", "shapes", "--input-size", "64",
            "--points", "stages", "--limit", "8", "--batch-size", "4", "--device", "cuda",
            "--out", str(tmp_path / "c.h5"), "--dry-run"]
    assert cli.main(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    weights = sum(t.numel() * t.element_size() for t in torchvision.models.resnet18().state_dict()
                  .values() if t.is_floating_point())
    assert weights < plan["weight_bytes"] < weights + 10**4  # + BatchNorm's int64 counters
    assert plan["device_bytes"] > plan["weight_bytes"]
    assert cli.main(argv + ["--max-channels", "100"]) == 0
    text = capsys.readouterr().out
    assert "device memory: about" in text
    assert "100 of 128" in text and "100 of 512" in text  # layer2.1 and layer4.1 are cut
    assert not (tmp_path / "c.h5").exists()


def test_cli_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, cli_state):
    out = tmp_path / "sub" / "c.h5"
    argv = ["extract", "--model", "resnet18", "--weights", "none",
            "--data", "shapes", "--input-size", "64",
            "--points", "layer1.1,layer4.1", "--max-size", "8", "--limit", "50", "--out",
            str(out), "--dry-run", "--device", "cpu"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    # layer1.1: 64 x 16x16 at 64 px, pooled to 8x8 float16 = 8 KiB per sample, 400 KiB for 50
    assert lines["layer1.1"][1:7] == ["64", "16x16", "8x8", "area", "4", "8.0"]
    assert "400.0 KiB" in " ".join(lines["layer1.1"])
    assert lines["layer4.1"][1:5] == ["512", "2x2", "2x2", "none"]
    assert "free disk" in text and "fits" in text and "host memory in flight" in text
    assert "keeps freed memory" not in text  # only the featlab command's own process does
    assert cli.main(argv + ["--compression", "lzf"]) == 0  # the copy made at the end counts
    assert "the disk holds up to" in capsys.readouterr().out
    assert "device memory" not in text  # on the CPU the forward is host memory
    if torch.cuda.is_available():
        assert cli.main(argv + ["--device", "cuda"]) == 0
        assert "device memory: about" in capsys.readouterr().out
    assert not out.parent.exists()
    assert cli.main(argv + ["--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["num_samples"] == 50 and plan["free_bytes"] > 0
    assert [p["bytes_per_sample"] for p in plan["points"]] == [64 * 8 * 8 * 2, 512 * 2 * 2 * 2]
    out.parent.mkdir()
    out.write_bytes(b"notes")  # the run would refuse what is there: the plan says so
    assert cli.main(argv) == 0
    assert "note: the run would be refused: `out` must not be an existing file" in (
        capsys.readouterr().out)
    assert out.read_bytes() == b"notes"


def test_cli_dry_run_under_torchrun_prints_once_for_the_job(tmp_path, capsys, cli_state,
                                                            monkeypatch):
    # every rank runs the command; each used to print the same plan
    argv = ["extract", "--model", "resnet18", "--weights", "none", "--data", "shapes",
            "--input-size", "32", "--limit", "10", "--out", str(tmp_path / "c.h5"), "--dry-run"]
    printed = []
    for rank in (0, 1):
        for key in ("RANK", "LOCAL_RANK"):
            monkeypatch.setenv(key, str(rank))
        for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE"):
            monkeypatch.setenv(key, "2")
        assert cli.main(argv) == 0
        printed.append(capsys.readouterr().out)
    assert "host memory in flight: about" in printed[0] and "in each of the 2 processes" in (
        printed[0])
    assert printed[1] == ""
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["0", "-5"])
def test_cli_refuses_an_input_size_that_is_not_positive(tmp_path, capsys, cli_state, value):
    # 0 once fell through to the weights' default size instead of being refused
    argv = ["extract", "--model", "resnet18", "--weights", "none", "--data", "shapes",
            "--input-size", value, "--limit", "2", "--out", str(tmp_path / "c.h5"), "--dry-run"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"featlab extract: error: `size` must be a positive int (the side of the "
                   f"square crop) or None (native size); got {value}. Fix: pass e.g. size=128 "
                   "(--input-size 128).")
    assert cli.main(["points", "resnet18", "--input-size", value]) == 2
    assert "`input_size` must be a positive int" in capsys.readouterr().err
