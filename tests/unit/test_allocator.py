"""keep_freed_memory: large freed blocks are reused instead of page-faulted back in."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

import featlab

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Allocate, touch and free a 64 MiB block 20 times, then print the minor page faults of 10 more
# rounds. 64 MiB is above glibc's largest mmap threshold (32 MiB): by default every round maps
# fresh pages (16k faults a round). Kept, the heap grows for the first rounds (an aligned request
# is a little larger than the block freed before it, until freed blocks coalesce; 4-10 rounds
# seen) and then serves every round from pages it already has.
SCRIPT = textwrap.dedent("""
    import resource, sys
    import torch
    import featlab
    if sys.argv[1] == "keep":
        assert featlab.keep_freed_memory()
    for _ in range(20):
        torch.ones(16 << 20)  # 64 MiB of float32, written, then freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(16 << 20)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def minor_faults(mode: str) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


def test_freed_blocks_are_reused_instead_of_faulted_back():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default, kept = minor_faults("default"), minor_faults("keep")
    assert default > 10 * pages, default  # a fresh mapping every round
    assert kept < pages // 10, kept


def run_cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "featlab", *args],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


def test_the_command_keeps_freed_memory_unless_told_not_to():
    on = run_cli("datasets", "-v")
    off = run_cli("datasets", "-v", FEATLAB_KEEP_MEMORY="0")
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    assert "keep freed memory (glibc mallopt): on" in on.stderr
    assert "keep freed memory" not in off.stderr


def test_the_dry_run_says_when_the_command_keeps_freed_memory(tmp_path):
    argv = ["extract", "--model", "resnet18", "--weights", "none",
            "--data", "shapes", "--input-size", "32",
            "--points", "layer1.1", "--limit", "4", "--device", "cpu", "--out",
            str(tmp_path / "c.h5"), "--dry-run"]
    on, off = run_cli(*argv), run_cli(*argv, FEATLAB_KEEP_MEMORY="0")
    assert on.returncode == off.returncode == 0, on.stderr + off.stderr
    note = "keeps freed memory for speed"
    assert note in on.stdout and "FEATLAB_KEEP_MEMORY=0" in on.stdout
    assert "host memory in flight" in off.stdout and note not in off.stdout


def test_in_process_main_leaves_the_allocator_alone(capsys, caplog):
    from featlab.cli import main

    with caplog.at_level("DEBUG", logger="featlab"):
        assert main(["datasets", "-v"]) == 0
    assert "keep freed memory" not in caplog.text + capsys.readouterr().err


def test_is_public():
    assert "keep_freed_memory" in dir(featlab)


def _write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)


@pytest.mark.parametrize("version", [1, 2])
def test_available_memory_is_capped_by_the_jobs_cgroup(tmp_path, version):
    """A SLURM job or container sees the whole host in /proc/meminfo; its cgroup's limit, less
    what it uses but the reclaimable file cache, is what it may still allocate."""
    from featlab.allocator import _cgroup_room

    gib = 1 << 30
    root, proc = tmp_path / "cgroup", tmp_path / "self-cgroup"
    if version == 2:
        proc.write_text("0::/slurm/job_7/step_0\n")
        _write(root / "slurm" / "job_7", memory__max=str(64 * gib),
               memory__current=str(40 * gib), memory__stat=f"anon 1\ninactive_file {8 * gib}\n")
        _write(root / "slurm" / "job_7" / "step_0", memory__max="max",
               memory__current=str(30 * gib), memory__stat="inactive_file 0\n")
    else:
        proc.write_text("5:cpu,cpuacct:/slurm/job_7\n4:memory:/slurm/job_7\n")
        _write(root / "memory", memory__limit_in_bytes=str(2 ** 63 - 4096),  # the host: none
               memory__usage_in_bytes=str(100 * gib), memory__stat="total_inactive_file 0\n")
        _write(root / "memory" / "slurm" / "job_7", memory__limit_in_bytes=str(64 * gib),
               memory__usage_in_bytes=str(40 * gib),
               memory__stat=f"cache 9\ntotal_inactive_file {8 * gib}\n")
    assert _cgroup_room(str(root), str(proc)) == 64 * gib - (40 - 8) * gib
    # inside a container the host's path is not mounted: its own cgroup is the mount's root
    inside = tmp_path / "inside"
    mount = inside / "memory" if version == 1 else inside
    limit = "memory.limit_in_bytes" if version == 1 else "memory.max"
    usage = "memory.usage_in_bytes" if version == 1 else "memory.current"
    _write(mount, **{limit.replace(".", "__"): str(8 * gib), usage.replace(".", "__"): str(gib)})
    assert _cgroup_room(str(inside), str(proc)) == 7 * gib
    assert _cgroup_room(str(tmp_path / "none"), str(proc)) is None  # no hierarchy: no cap
    assert _cgroup_room(str(root), str(tmp_path / "missing")) is None


def test_available_memory_is_the_smaller_of_host_and_cgroup(monkeypatch):
    from featlab import allocator

    monkeypatch.setattr(allocator, "_meminfo_available", lambda: 500 << 30)
    monkeypatch.setattr(allocator, "_cgroup_room", lambda: 20 << 30)
    assert allocator.available_memory() == 20 << 30
    monkeypatch.setattr(allocator, "_cgroup_room", lambda: None)
    assert allocator.available_memory() == 500 << 30
    monkeypatch.setattr(allocator, "_meminfo_available", lambda: None)
    assert allocator.available_memory() is None
