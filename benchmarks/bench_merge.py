"""Merge benchmark: ``featlab merge`` against copying the shard files, in one run.

Shards come from a real 2-process extraction (``torchrun``, gloo, CPU): resnet18 (random init)
at 128 px on ``shapes``, every skip point, float16. Then, interleaved over rounds:

* **cp**: ``shutil.copyfile`` of every shard file: the least any one-file copy of these bytes
  costs (no HDF5 at all; the result is not one file);
* **featlab merge**: the checks (settings, ranks, ranges, ids) and the copy into one
  self-contained file, chunk by chunk;
* **h5py, whole arrays**: the plain way -- open the sharded cache's main file and write each
  dataset into a new file with ``create_dataset(name, data=f[name][()])`` (every array whole in
  memory; chunks and attributes not kept);
* **featlab merge --virtual**: the checks and a main file of virtual datasets (no copy).

    python benchmarks/bench_merge.py [--samples 512] [--repeats 3] [--compression lzf]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py

from featlab.cache.merge import merge_shards


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(folder: Path, samples: int, size: int, compression: str) -> Path:
    out = folder / "c.h5"
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m", "featlab",
           "extract", "--model", "resnet18", "--weights", "none",
           "--data", "shapes", "--input-size", str(size),
           "--points", "all", "--limit", str(samples), "--batch-size", "32", "--workers", "0",
           "--compression", compression, "--quiet", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True)
    return out


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def copy_files(shards: list[Path], dst: Path) -> None:
    dst.mkdir(exist_ok=True)
    for s in shards:
        shutil.copyfile(s, dst / s.name)


def plain_h5py(main: Path, dst: Path) -> None:
    with h5py.File(main, "r") as f, h5py.File(dst, "w") as g:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        for name in names:
            g.create_dataset(name, data=f[name][()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compression", default="none", choices=["none", "lzf", "gzip"],
                        help="of the extraction (the merge keeps it)")
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        folder = Path(tmp)
        main_file = make_shards(folder, args.samples, args.size, args.compression)
        shards = sorted((folder / "c.h5.shards").glob("rank-*.h5"))
        size = sum(s.stat().st_size for s in shards)
        with h5py.File(main_file, "r") as f:
            n = len(f["ids"])
        print(f"{len(shards)} shards, {n} samples, {size / 2**20:.0f} MiB "
              f"(compression {args.compression}); load average {os.getloadavg()[0]:.2f}")
        times: dict[str, list[float]] = {k: [] for k in ("cp", "featlab merge", "h5py, whole "
                                                         "arrays", "featlab merge --virtual")}
        for _ in range(args.repeats):
            for name, fn in [
                ("cp", lambda: copy_files(shards, folder / "copied")),
                ("featlab merge", lambda: merge_shards(main_file, folder / "one.h5",
                                                       progress=False)),
                ("h5py, whole arrays", lambda: plain_h5py(main_file, folder / "plain.h5")),
                ("featlab merge --virtual", lambda: merge_shards(
                    main_file, folder / "v.h5", virtual=True, progress=False)),
            ]:
                for leftover in ("copied", "one.h5", "plain.h5", "v.h5"):  # not timed
                    path = folder / leftover
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                times[name].append(timed(fn))
        floor = times["cp"]
        print(f"\n{'variant':<26} {'seconds':>8} {'MB/s':>7} {'vs cp':>6}")
        for name, runs in times.items():
            ratio = statistics.median(c / t for c, t in zip(floor, runs))
            print(f"{name:<26} {min(runs):8.2f} {size / min(runs) / 1e6:7.0f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
