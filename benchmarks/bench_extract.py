"""Extraction benchmark: bare forward vs ``featlab.extract`` vs capture written the plain way.

resnet18 (random init) at 128 px on ``shapes``, every skip point, float16, in one process:

* **bare**: ``model(spec.normalize(x))`` under ``torch.inference_mode`` over the same batches,
  already in memory;
* **featlab extract**: ``featlab.extract`` end to end (points, file creation, a ``DataLoader``
  over the samples, the forward, pooling/cast/copy and the float16 error bound in hooks, the
  writer thread, finalisation);
* **featlab, exact error**: the same with ``error_stat="exact"`` (the hooks also copy every
  point back to float32 and take max |x - stored|);
* **featlab, buffered**: the same with ``FEATLAB_DIRECT_IO=0`` (every row through h5py and the
  page cache instead of ``O_DIRECT``);
* **floor**: the least any extractor of these bytes must do -- the forward, one cast of every
  point into reused float16 buffers inside the hooks, and a lower-priority thread that writes
  those bytes to a file with ``O_DIRECT`` as featlab does (no HDF5, no statistics, no flags);
* **featlab, lzf / gzip** (only with ``--compression lzf gzip``): ``featlab.extract`` with
  ``compression=...``: the same extraction, then the copy into a compressed file;
* **plain**: the usual script -- forward hooks that keep ``out.half()`` (torch's vectorised
  cast, which is also a copy, so ``bn1`` is stored before the in-place ReLU rewrites it), then
  ``.cpu().numpy()`` and h5py writes in the loop, from the same ``DataLoader``.

Then, in a child process that first calls ``featlab.keep_freed_memory()`` -- what the
``featlab`` command does for its own process -- **bare**, **featlab extract** (both error
statistics) and the **floor** again: the rate a user of the command gets, and the like-for-like
ratios under that allocator setting.

``--parts N`` splits the goal's gap into its pieces, in one process that keeps freed memory,
N rounds in rotating order: **bare**; **cast** (hooks that cast every point into reused
float16 buffers, nothing else); **cast + bound** (the same plus the two reductions of the
default error statistic, as featlab's hooks take them); the **floor**; **featlab extract**.
Medians of the same-round ratios with 95 % bootstrap intervals, end to end and steady (from
the median time between two full batches' forwards: the throughput without setup and
finalisation, whose weight shrinks as N grows).

The samples are rendered once up front and served from memory, so that all measure the
model and the cache, not the procedural data generator (its rate is printed separately). By
default they are the 2000 of ``shapes``' train split, a whole split as a study extracts it:
what the goal measures is throughput, and an extraction's setup and its last batch's writes
(~0.13 s a run here) weigh 3-4 points of a 512-sample run at this size, a quarter of that over
the split. ``--samples 512`` is the short run.

``--device cuda`` runs the default mode on a GPU: the model lives there, the bare forward moves
each batch from pinned host memory to the device as a ``DataLoader`` with ``pin_memory`` hands
it over (and waits for the device before its clock stops), featlab and the plain loop run with
``device="cuda"``, and the floor's hooks copy each point asynchronously into pinned float16
buffers that its writer takes once the batch's CUDA event has completed. A ``dd``-like
``O_DIRECT`` write of the same bytes is timed in the same run: there the disk, not the forward,
is usually the limit.

``--fresh N`` measures instead the goal's three rates -- **bare**, **featlab extract** and the
**floor** -- each in a process of its own (a warm-up forward, then one timed run), under both
allocator settings, for N rounds in rotating order, and prints each ratio's median over the
rounds with a 95 % bootstrap interval. Within one process glibc's mmap threshold moves with
what ran before (the same bare forward took 131k or 600k page faults, 5.3 or 7.5 s), so in the
default setting only fresh processes compare like with like.

    python benchmarks/bench_extract.py [--samples 2000] [--batch-size 32] [--repeats 3]
                                       [--compression lzf gzip] [--fresh N] [--parts N]
                                       [--device cuda]

Run it on a quiet machine (``uptime``: load below 1.5 on this 2-core box).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import torch
from torch.utils.data import DataLoader

import featlab
from featlab.cache.direct import aligned_empty
from featlab.cache.stream import WRITER_NICE, _lower_priority
from featlab.cache.writer import extract
from featlab.data import load_dataset


class InMemory(torch.utils.data.Dataset):
    """The samples of a featlab data set, rendered once and kept in memory (same protocol)."""

    def __init__(self, ds):
        self.name, self.split, self.classes = ds.name, ds.split, ds.classes
        self.ignore_index, self.ids = ds.ignore_index, list(ds.ids)
        self._settings = {**ds.settings(), "in_memory": True}
        self._samples = [ds[i] for i in range(len(ds))]

    def settings(self):
        return dict(self._settings)

    def __len__(self):
        return len(self._samples)

    def __getitem__(self, i):
        return self._samples[i]


def _batches(ds, batch_size: int) -> list[torch.Tensor]:
    """The data set's images stacked into batches, once, before any clock starts."""
    return [torch.stack([ds[i]["image"] for i in range(s, min(len(ds), s + batch_size))])
            for s in range(0, len(ds), batch_size)]


def _points(model, ds) -> list:
    return featlab.skip_points(model, input_size=ds[0]["image"].shape[-1])


def _hook_points(model, points, fn) -> list:
    """A plain forward hook ``fn(name, output)`` on every skip point; returns the handles."""
    modules = dict(model.named_modules())
    return [modules[p.module].register_forward_hook(
        lambda m, a, out, name=p.name: fn(name, out)) for p in points]


def bare_rate(model, spec, ds, batch_size: int, repeats: int, device: str = "cpu") -> float:
    cuda = torch.device(device).type == "cuda"
    batches = [x.pin_memory() if cuda else x for x in _batches(ds, batch_size)]
    best = 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in batches:
                model(spec.normalize(x.to(device, non_blocking=True)))
            if cuda:
                torch.cuda.synchronize(device)
            best = max(best, len(ds) / (time.perf_counter() - t0))
    return best


def hooked_rate(model, spec, ds, batch_size: int, bound: bool) -> float:
    """The bare loop with hooks that cast every point into reused float16 buffers (``bound``:
    and take the per-sample amax and amin of the stored copy, as featlab's hooks do)."""
    points = _points(model, ds)
    buffers = [{p.name: torch.empty((batch_size, p.channels, *p.size), dtype=torch.float16)
                for p in points} for _ in range(2)]
    current = {}

    def hook(name, out):
        flat = current[name][:len(out)].view(len(out), -1)
        flat.copy_(out.reshape(len(out), -1))
        if bound:
            flat.amax(1), flat.amin(1)

    batches = _batches(ds, batch_size)
    handles = _hook_points(model, points, hook)
    try:
        t0 = time.perf_counter()
        with torch.inference_mode():
            for k, x in enumerate(batches):
                current = buffers[k % 2]
                model(spec.normalize(x))
        return len(ds) / (time.perf_counter() - t0)
    finally:
        for h in handles:
            h.remove()


def featlab_rate(model, spec, ds, batch_size: int, folder: str, direct: bool = True,
                 error_stat: str = "bound", compression: str | None = None,
                 device: str = "cpu") -> tuple[float, float, int]:
    path = _fresh(os.path.join(folder, "featlab.h5"))
    os.environ["FEATLAB_DIRECT_IO"] = "1" if direct else "0"
    t0 = time.perf_counter()
    result = extract(model, ds, "all", path, spec=spec, batch_size=batch_size, dtype="float16",
                     error_stat=error_stat, compression=compression, num_workers=0,
                     progress=False, force=True, device=device)
    seconds = time.perf_counter() - t0
    return len(ds) / seconds, result.written * _row_bytes(path) / seconds / 1e6, result.bytes


def floor_rate(model, spec, ds, batch_size: int, folder: str, device: str = "cpu") -> float:
    import queue
    import threading

    cuda = torch.device(device).type == "cuda"
    points = _points(model, ds)
    buffers = [{p.name: aligned_empty((batch_size, p.channels, *p.size), torch.float16,
                                      pin=cuda) for p in points} for _ in range(3 + cuda)]
    free, todo = queue.LifoQueue(), queue.Queue(maxsize=1)  # slot reuse as featlab's
    for b in buffers:
        free.put(b)
    current = {}

    def hook(name, out):
        current[name][:len(out)].copy_(out, non_blocking=cuda)

    def write(fd):
        _lower_priority(WRITER_NICE)  # fill the forward's gaps rather than preempt it
        while (b := todo.get()) is not None:
            for t in b.values():
                os.write(fd, t.numpy().data)
            free.put(b)

    handles = _hook_points(model, points, hook)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0, pin_memory=cuda)
    # as featlab writes its rows (every buffer here is 4 KiB-aligned in size and address)
    fd = _open_direct(os.path.join(folder, "floor.bin"))
    writer = threading.Thread(target=write, args=(fd,))
    t0 = time.perf_counter()
    writer.start()
    try:
        with torch.inference_mode():
            lagging = None  # on a GPU: handed over once its copies are done, one batch late
            for batch in loader:
                current = free.get()
                model(spec.normalize(batch["image"].to(device, non_blocking=True)))
                if not cuda:
                    todo.put(current)
                    continue
                event = torch.cuda.Event()
                event.record()
                if lagging is not None:
                    lagging[1].synchronize()
                    todo.put(lagging[0])
                lagging = current, event
            if lagging is not None:
                lagging[1].synchronize()
                todo.put(lagging[0])
    finally:
        todo.put(None)
        writer.join()
        os.close(fd)
        for h in handles:
            h.remove()
    return len(ds) / (time.perf_counter() - t0)


def plain_rate(model, spec, ds, batch_size: int, folder: str, device: str = "cpu"
               ) -> tuple[float, float, int]:
    path = _fresh(os.path.join(folder, "plain.h5"))
    points = _points(model, ds)
    t0 = time.perf_counter()
    store = {}
    handles = _hook_points(model, points, lambda name, out: store.__setitem__(name, out.half()))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0,
                        pin_memory=torch.device(device).type == "cuda")
    try:
        with h5py.File(path, "w") as f, torch.inference_mode():
            dsets = {p.name: f.create_dataset(f"points/{p.name}", (len(ds), p.channels, *p.size),
                                              "f2") for p in points}
            labels = f.create_dataset("labels", (len(ds), *ds[0]["mask"].shape), "u1")
            start = 0
            for batch in loader:
                model(spec.normalize(batch["image"].to(device, non_blocking=True)))
                n = len(batch["image"])
                for name, out in store.items():
                    dsets[name][start:start + n] = out.cpu().numpy()
                labels[start:start + n] = batch["mask"].numpy()
                start += n
    finally:
        for h in handles:
            h.remove()
    seconds = time.perf_counter() - t0
    size = os.path.getsize(path)
    return len(ds) / seconds, size / seconds / 1e6, size


def _fresh(path: str) -> str:
    """``path`` with the previous round's file removed before the clock starts (deleting a
    1 GB file takes ~0.2 s here: a cost of the benchmark's repetition, not of extracting)."""
    if os.path.exists(path):
        os.remove(path)
    return path


def _open_direct(path: str) -> int:
    """A new, empty ``path`` opened for writing with ``O_DIRECT`` (plain writes where the OS or
    file system has none)."""
    flags = os.O_WRONLY | os.O_CREAT
    try:
        return os.open(_fresh(path), flags | os.O_DIRECT)
    except (AttributeError, OSError):
        return os.open(path, flags)


def _row_bytes(path: str) -> int:
    with h5py.File(path, "r") as f:
        return sum(d[0].nbytes for d in f["points"].values()) + f["labels"][0].nbytes


def kept_rates(args: argparse.Namespace) -> dict:
    """Bare, featlab (error bound and exact) and floor rates from a child process that
    keeps freed memory (the command's setting, which is process-wide and cannot be undone,
    hence a process of its own)."""
    cmd = [sys.executable, __file__, "--child", "--samples", str(args.samples), "--size",
           str(args.size), "--batch-size", str(args.batch_size)]
    if args.dir:
        cmd += ["--dir", args.dir]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    done = subprocess.run(cmd + ["--device", args.device], capture_output=True, text=True,
                          check=True)
    out = json.loads(done.stdout.splitlines()[-1])
    if not out["kept"]:
        print("  (keep_freed_memory does not apply here, not glibc: the 'memory kept' rows ran "
              "with the default allocator)")
    return out


def measure_one(args: argparse.Namespace, ds, model, spec) -> None:
    """A ``--fresh`` child: one warm-up forward, then one timed run of ``args.measure``."""
    kept = featlab.keep_freed_memory() if args.keep else False
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        bare_rate(model, spec, ds, args.batch_size, 1)
        rate = {"bare": lambda: bare_rate(model, spec, ds, args.batch_size, 1),
                "featlab": lambda: featlab_rate(model, spec, ds, args.batch_size, folder)[0],
                "floor": lambda: floor_rate(model, spec, ds, args.batch_size, folder),
                }[args.measure]()
    print(json.dumps({"kept": kept, "rate": rate}))


def child(args: argparse.Namespace, ds, model, spec) -> None:
    kept = featlab.keep_freed_memory()
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        dev = args.device
        bare_rate(model, spec, ds, args.batch_size, 1, dev)  # warm-up: the heap reaches its size
        bare = bare_rate(model, spec, ds, args.batch_size, 1, dev)
        feat = featlab_rate(model, spec, ds, args.batch_size, folder, device=dev)
        exact = featlab_rate(model, spec, ds, args.batch_size, folder, error_stat="exact",
                             device=dev)
        floor = floor_rate(model, spec, ds, args.batch_size, folder, dev)
    print(json.dumps({"kept": kept, "bare": bare, "featlab": feat, "exact": exact,
                      "floor": floor}))


def disk_rate(folder: str, nbytes: int) -> float:
    """MB/s of ``nbytes`` written with ``O_DIRECT`` in 64 MiB pieces from one aligned buffer
    (what ``dd oflag=direct`` measures): the disk's own limit, for the rows above."""
    piece = aligned_empty((64 * 2**20,), torch.uint8)
    piece.fill_(1)
    path = os.path.join(folder, "disk.bin")
    fd = _open_direct(path)
    t0 = time.perf_counter()
    try:
        for _ in range(max(1, nbytes // piece.numel())):
            os.write(fd, piece.numpy().data)
    finally:
        os.close(fd)
    rate = os.path.getsize(path) / (time.perf_counter() - t0) / 1e6
    os.remove(path)
    return rate


def median_interval(num: list[float], den: list[float]) -> str:
    """The median of the paired ratios ``num / den`` and its 95 % bootstrap interval over the
    rounds (seeded)."""
    import numpy as np

    ratios = np.array(num) / np.array(den)
    picks = np.random.default_rng(0).integers(0, len(ratios), size=(10_000, len(ratios)))
    low, high = np.percentile(np.median(ratios[picks], axis=1), [2.5, 97.5])
    return f"{np.median(ratios):.3f} [{low:.3f}, {high:.3f}]"


def parts_rounds(args: argparse.Namespace, ds, model, spec) -> None:
    """``--parts``: bare, cast, cast + bound, floor and featlab in this process, which keeps
    freed memory (the command's setting: in one process the default allocator's state depends
    on what ran before), rotating order; each run's rate end to end and its steady rate (the
    median time from one full batch's forward to the next: without setup and finalisation)."""
    kept = featlab.keep_freed_memory()
    starts: list[float] = []
    model.register_forward_pre_hook(  # every forward of a full batch, whoever runs it
        lambda m, a: starts.append(time.perf_counter()) if len(a[0]) == args.batch_size
        else None)
    variants = {
        "bare": lambda folder: bare_rate(model, spec, ds, args.batch_size, 1),
        "cast": lambda folder: hooked_rate(model, spec, ds, args.batch_size, bound=False),
        "cast + bound": lambda folder: hooked_rate(model, spec, ds, args.batch_size,
                                                    bound=True),
        "floor": lambda folder: floor_rate(model, spec, ds, args.batch_size, folder),
        "featlab": lambda folder: featlab_rate(model, spec, ds, args.batch_size, folder)[0],
    }
    names = list(variants)
    rates = {v: [] for v in names}
    steady = {v: [] for v in names}  # images/s from the median batch-to-batch time
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        for v in names:  # warm-up: the heap reaches its size, every path runs once
            variants[v](folder)
        for r in range(args.parts):
            for v in names[r % len(names):] + names[:r % len(names)]:
                starts.clear()
                rates[v].append(variants[v](folder))
                cycles = [b - a for a, b in zip(starts[1:], starts[2:])]  # not the first
                steady[v].append(args.batch_size / statistics.median(cycles))
            print(f"  round {r + 1}: " + ", ".join(f"{v} {rates[v][-1]:.1f}" for v in names)
                  + f" images/s (load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\nresnet18, {args.size} px, {args.samples} samples, batch {args.batch_size}, all "
          f"skip points, float16; {args.parts} rounds in one process"
          f"{' that keeps freed memory' if kept else ' (default allocator: not glibc)'}; "
          "median ratio over rounds [95 % bootstrap interval]; steady: from the median time "
          "between two full batches' forwards (no setup, no finalisation)")
    for v in names:
        print(f"  {v:<13} {statistics.median(rates[v]):6.1f} images/s, vs bare "
              f"{median_interval(rates[v], rates['bare'])}; steady "
              f"{statistics.median(steady[v]):6.1f} images/s, vs bare "
              f"{median_interval(steady[v], steady['bare'])}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


FRESH = ("bare", "featlab", "floor")


def fresh_rounds(args: argparse.Namespace) -> None:
    """``--fresh``: every variant in a new process, both allocator settings, rotating order."""
    rates = {(keep, v): [] for keep in (False, True) for v in FRESH}
    for r in range(args.fresh):
        for keep in (False, True):
            for v in FRESH[r % 3:] + FRESH[:r % 3]:
                cmd = [sys.executable, __file__, "--measure", v, *(["--keep"] if keep else []),
                       "--samples", str(args.samples), "--size", str(args.size), "--batch-size",
                       str(args.batch_size), *(["--dir", args.dir] if args.dir else []),
                       *(["--threads", str(args.threads)] if args.threads else [])]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rates[keep, v].append(json.loads(done.stdout.splitlines()[-1])["rate"])
        print(f"  round {r + 1}: " + "; ".join(
            f"{'memory kept' if keep else 'default'}: " + ", ".join(
                f"{v} {rates[keep, v][-1]:.1f}" for v in FRESH) for keep in (False, True))
            + f" images/s (load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\nresnet18, {args.size} px, {args.samples} samples, batch {args.batch_size}, all "
          f"skip points, float16; {args.fresh} rounds, one process per run; median ratio over "
          "rounds [95 % bootstrap interval]")
    for keep in (False, True):
        setting = "memory kept" if keep else "default allocator"
        bare = rates[keep, "bare"]
        print(f"{setting}: bare {statistics.median(bare):.1f} images/s (median)")
        for v in FRESH[1:]:
            print(f"  {v:<8} {statistics.median(rates[keep, v]):6.1f} images/s, vs bare "
                  f"{median_interval(rates[keep, v], bare)}")
    print(f"the command (featlab, memory kept) vs an ordinary bare forward: "
          f"{median_interval(rates[True, 'featlab'], rates[False, 'bare'])}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=2000,
                        help="samples of shapes' train split (default: all 2000 of it)")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="folder for the files (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--compression", nargs="*", default=[], choices=["lzf", "gzip"],
                        help="also run featlab with these compressions (rows 'featlab, lzf', ...)")
    parser.add_argument("--fresh", type=int, default=0, metavar="N",
                        help="instead: bare, featlab and the floor, each in a fresh process, "
                             "both allocator settings, N rounds, medians with 95%% intervals")
    parser.add_argument("--parts", type=int, default=0, metavar="N",
                        help="instead: bare, cast, cast + bound, floor and featlab in one "
                             "process that keeps freed memory, N rounds, medians with 95%% "
                             "intervals")
    parser.add_argument("--device", default="cpu",
                        help="where the model runs (default mode only): cpu, cuda, cuda:1...")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=FRESH, help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if (args.fresh or args.parts) and torch.device(args.device).type != "cpu":
        parser.error(f"--fresh and --parts measure the CPU; got --device {args.device}. Fix: "
                     "leave --device out, or drop --fresh/--parts.")
    if args.parts and args.samples // args.batch_size < 3:
        parser.error(f"--parts times the steady state between full batches and needs at least 3; "
                     f"got --samples {args.samples} at --batch-size {args.batch_size}. Fix: "
                     f"--samples {3 * args.batch_size} or more.")
    if args.fresh:
        fresh_rounds(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    raw = load_dataset("shapes", split="train", size=args.size, length=args.samples)
    t0 = time.perf_counter()
    ds = InMemory(raw)
    rendering = len(ds) / (time.perf_counter() - t0)
    model, spec = featlab.get_backbone("resnet18", weights="none")
    model.to(args.device)
    if args.measure:
        measure_one(args, ds, model, spec)
        return
    if args.parts:
        parts_rounds(args, ds, model, spec)
        return
    if args.child:
        child(args, ds, model, spec)
        return
    dev = args.device
    gpu = (f", {torch.cuda.get_device_name(dev)}" if torch.device(dev).type == "cuda" else "")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}, load average "
          f"{os.getloadavg()[0]:.2f}")
    print(f"shapes generation at {args.size} px: {rendering:.0f} images/s (done once, before "
          "the timings)")
    bare, feat, exact, buffered, floor, plain, disk = [], [], [], [], [], [], []
    packed = {c: [] for c in args.compression}
    kept = {"bare": [], "featlab": [], "exact": [], "floor": []}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        bare_rate(model, spec, ds, args.batch_size, 1, dev)  # warm-up (allocator, kernels)
        for _ in range(args.repeats):  # interleaved rounds: each ratio compares neighbours
            bare.append(bare_rate(model, spec, ds, args.batch_size, 1, dev))
            feat.append(featlab_rate(model, spec, ds, args.batch_size, folder, device=dev))
            exact.append(featlab_rate(model, spec, ds, args.batch_size, folder,
                                      error_stat="exact", device=dev))
            buffered.append(featlab_rate(model, spec, ds, args.batch_size, folder, direct=False,
                                         device=dev))
            floor.append(floor_rate(model, spec, ds, args.batch_size, folder, dev))
            plain.append(plain_rate(model, spec, ds, args.batch_size, folder, dev))
            disk.append(disk_rate(folder, feat[-1][2]))
            for c, runs in packed.items():
                runs.append(featlab_rate(model, spec, ds, args.batch_size, folder,
                                         compression=c, device=dev))
            child_out = kept_rates(args)
            for key, runs in kept.items():
                runs.append(child_out[key])
            print(f"  round: bare {bare[-1]:.1f}, featlab {feat[-1][0]:.1f}, exact error "
                  f"{exact[-1][0]:.1f}, buffered "
                  f"{buffered[-1][0]:.1f}, floor {floor[-1]:.1f}, plain {plain[-1][0]:.1f}; "
                  f"memory kept: bare {kept['bare'][-1]:.1f}, featlab "
                  f"{kept['featlab'][-1][0]:.1f}, exact error "
                  f"{kept['exact'][-1][0]:.1f}, floor {kept['floor'][-1]:.1f} images/s; disk "
                  f"{disk[-1]:.0f} MB/s (load {os.getloadavg()[0]:.2f})", flush=True)
    print(f"\nresnet18, {args.size} px, {len(ds)} samples, batch {args.batch_size}, all skip "
          f"points, float16, on {dev}; images/s: best of {args.repeats} rounds; ratios: median "
          "of the same-round ratios [95 % bootstrap interval over the rounds]")
    print(f"{'variant':<36} {'images/s':>9} {'vs bare':>22} {'vs kept bare':>22} {'MB/s':>7} "
          f"{'file':>10}")
    rows = [("bare forward", [(b, None, None) for b in bare]), ("featlab extract", feat),
            ("featlab, exact error", exact), ("featlab, buffered", buffered),
            ("floor: cast + direct write", [(f, None, None) for f in floor]),
            ("plain hooks + h5py", plain),
            *((f"featlab, {c}", runs) for c, runs in packed.items()),
            ("memory kept: bare forward", [(b, None, None) for b in kept["bare"]]),
            ("memory kept: featlab extract", kept["featlab"]),
            ("memory kept: featlab, exact error", kept["exact"]),
            ("memory kept: floor", [(f, None, None) for f in kept["floor"]])]
    shown = {}  # name: (vs bare, vs kept bare), as printed
    for name, runs in rows:
        best = max(runs, key=lambda r: r[0])
        rates = [r[0] for r in runs]
        ratio = "1" if name == "bare forward" else median_interval(rates, bare)
        like = ("" if not name.startswith("memory kept") else "1" if name.endswith("bare forward")
                else median_interval(rates, kept["bare"]))
        shown[name] = ratio, like
        mbs, size = best[1], best[2]
        print(f"{name:<36} {best[0]:9.1f} {ratio:>22} {like:>22} "
              f"{'' if mbs is None else f'{mbs:7.0f}':>7} "
              f"{'' if size is None else f'{size / 2**20:7.0f} MiB':>10}")
    command = shown["memory kept: featlab extract"]
    print(f"goal (featlab extract >= 0.90 x bare): like for like {shown['featlab extract'][0]}, "
          f"with freed memory kept {command[1]}; the command's setting against an ordinary bare "
          f"forward {command[0]}")
    print(f"disk, O_DIRECT writes of the same bytes: {statistics.median(disk):.0f} MB/s (median); "
          f"featlab extract wrote {statistics.median(r[1] for r in feat):.0f} MB/s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
