"""Head training throughput from a cache vs from images through the frozen backbone, and the
wall time of the full ``stages`` sweep with 3 seeds on ``shapes``.

The same single-skip head (resnet18 with the ``shapes`` weights, skip ``layer2.1``, sum fusion)
trains one epoch on the same images twice in one process: from an activation cache (features
read from HDF5, no backbone compute; the default of ``featlab train-head``) and from the images
through a ``FrozenBackbone`` (render, normalize, forward, capture). It prints train images/s of
both and their ratio, the cache path again with ``deterministic=True`` (the price of runs that
repeat bit for bit on a GPU), and the one-off extraction rate that the cache path pays up
front. Then (unless ``--no-sweep``) it extracts train/val caches and times
``featlab.segment.sweep`` over the ``stages`` points with 3 seeds — the experiment of the
README — with its table.

    python benchmarks/bench_heads.py [--quick] [--size 128] [--images 256] [--no-sweep]
                                     [--preloads] [--statistics] [--device cuda]
                                     [--weights none]

Before the sweep it replays the sweep's preloads in its run order, with one
:class:`~featlab.segment.sources.Preloads` shared by all runs and with one per run (each run
reading its own arrays, the baseline), and prints seconds and bytes read; ``--preloads`` does
only that (and the caches it needs). ``--statistics`` times only the sweep's image bootstrap
(intervals and P(best)) on synthetic confusion matrices of the val sizes of VOC, Cityscapes and
ADE20K: class totals per image against the einsum over whole confusion matrices it replaced.

``--quick``: 64 images, 64 px, and a small sweep (200/100 images, 2 epochs) to check the script.
Run it with ``OMP_NUM_THREADS=1`` on a shared machine; the figures depend on the load.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import featlab
from featlab.segment.heads import FrozenBackbone, SegHead
from featlab.segment import runs
from featlab.segment.sources import CacheSource, ImageSource, Preloads
from featlab.segment.train import HeadSettings, fit


def extract(model, spec, split, n, size, path):
    ds = featlab.load_dataset("shapes", split=split, size=size)
    t0 = time.perf_counter()
    featlab.extract(model, ds, "stages", path, spec=spec, batch_size=32, dtype="float16",
                    limit=n, num_workers=1, progress=False, force=True)
    return n / (time.perf_counter() - t0)


def head_for(cache, points, seed=0):
    last, skip = (cache.point(p) for p in points)
    torch.manual_seed(seed)
    return SegHead(last.name, last.channels, len(cache.classes), skip=skip.name,
                   skip_channels=skip.channels)


def throughput(tmp: Path, size: int, n: int, batch_size: int, device: str, weights: str
               ) -> None:
    model, spec = featlab.get_backbone("resnet18", weights=weights)
    rate = extract(model, spec, "train", n, size, tmp / "t.h5")
    extract(model, spec, "val", 8, size, tmp / "v.h5")
    train, val = featlab.open_cache(tmp / "t.h5"), featlab.open_cache(tmp / "v.h5")
    points = [train.point_names[-1], "layer2.1"]
    settings = HeadSettings(skip="layer2.1", epochs=1, batch_size=batch_size)
    frozen = FrozenBackbone(model, points)
    results = {}
    for kind in ("cache", "images", "cache again", "cache, deterministic"):
        head = head_for(train, points)
        if kind == "images":
            src = ImageSource(featlab.load_dataset("shapes", "train", size=size), train.index,
                              frozen, spec, points)
            vsrc = ImageSource(featlab.load_dataset("shapes", "val", size=size), val.index,
                               frozen, spec, points)
        else:
            src, vsrc = CacheSource(train, points), CacheSource(val, points)
        head.set_input_stats(CacheSource(train, points).stats())
        r = fit(head, src, vsrc, HeadSettings(**{**settings.to_dict(), "deterministic":
                                                 kind.endswith("deterministic")}),
                tmp / f"run-{kind}", device=device, progress=False,
                backbone=frozen if kind == "images" else None, classes=train.classes)
        results[kind] = r.train_images_per_second
    cache_rate = max(results["cache"], results["cache again"])
    print(f"resnet18 ({weights} weights), {size} px, {n} images, batch {batch_size}, skip "
          f"layer2.1 (sum), on {device}, {torch.get_num_threads()} thread(s), load "
          f"{os.getloadavg()[0]:.2f}")
    print(f"  train from cache      {cache_rate:8.1f} img/s   (runs: {results['cache']:.1f}, "
          f"{results['cache again']:.1f})")
    print(f"  train from images     {results['images']:8.1f} img/s   (frozen backbone forward "
          "every step)")
    print(f"  ratio cache / images  {cache_rate / results['images']:8.1f}x")
    det = results["cache, deterministic"]
    print(f"  cache, deterministic  {det:8.1f} img/s   ({det / cache_rate:.2f}x the cache rate)")
    saved = 1 / results["images"] - 1 / cache_rate  # seconds saved per image and epoch
    even = (1 / rate) / saved if saved > 0 else float("inf")
    print(f"  one-off extraction    {rate:8.1f} img/s   (the cache pays for itself after "
          f"{even:.1f} epochs)")


def sweep_caches(tmp: Path, size: int, n_train: int, n_val: int, weights: str) -> float:
    """The sweep's train and val caches (``stages``); returns the seconds it took."""
    model, spec = featlab.get_backbone("resnet18", weights=weights)
    t0 = time.perf_counter()
    extract(model, spec, "train", n_train, size, tmp / "train.h5")
    extract(model, spec, "val", n_val, size, tmp / "val.h5")
    return time.perf_counter() - t0


def _evict(*paths: Path) -> None:
    """Drop the files' pages from the page cache (clean pages; no root needed)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sweep_preloads(tmp: Path, seeds: int = 3, rounds: int = 2) -> None:
    """What the sweep's runs read into memory, in its run order: one ``Preloads`` shared by all
    runs (the sweep's) against one per run (each run reading its own, as before 2026-12-05).

    Twice: with the files in the page cache (a node whose RAM holds the caches twice over), and
    with their pages dropped before every run (caches larger than the page cache, or on a
    network file system whose client cache does not keep them)."""
    paths = (tmp / "train.h5", tmp / "val.h5")
    train, val = (featlab.open_cache(p) for p in paths)
    last = train.point_names[-1]
    configs = [None, *(p for p in train.select("stages") if p != last)]
    print(f"\nthe sweep's preloads ({seeds} seeds x {len(configs)} runs, train {len(train)} + val "
          f"{len(val)} samples; best of {rounds}, load {os.getloadavg()[0]:.2f}):")
    for cold in (False, True):
        figures: dict[str, list[tuple[float, int]]] = {"one per run": [], "shared": []}
        for _ in range(rounds):
            for kind, times in figures.items():
                shared, read, seconds = Preloads(), 0, 0.0
                if not cold:
                    for path in paths:  # into the page cache
                        Path(path).read_bytes()
                for _ in range(seeds):
                    for skip in configs:
                        if cold:
                            _evict(*paths)
                        store = shared if kind == "shared" else Preloads()
                        t0 = time.perf_counter()
                        with store.run():
                            for cache in (train, val):
                                store.take(cache, [last] + ([skip] if skip else []))
                        seconds += time.perf_counter() - t0
                        read += 0 if store is shared else store.bytes_read
                times.append((seconds, read + shared.bytes_read * (kind == "shared")))
        (t_own, b_own), (t_shared, b_shared) = (min(v) for v in figures.values())
        print(f"  {'dropped before each run' if cold else 'in the page cache'}:")
        print(f"    one per run  {t_own:6.2f} s  {b_own / 1e9:6.2f} GB read")
        print(f"    shared       {t_shared:6.2f} s  {b_shared / 1e9:6.2f} GB read   "
              f"({t_own / t_shared:.1f}x faster, {b_own / b_shared:.1f}x fewer bytes)")


def sweep_statistics(quick: bool = False) -> None:
    """The sweep's image bootstrap (intervals and P(best)) at the val sizes of real data sets:
    resampled mIoU from each image's class totals (featlab) against the einsum over the
    per-image confusion matrices that it replaced (the baseline), same draws, same run."""
    import numpy as np

    from featlab.segment.metrics import _iou
    from featlab.segment.sweep import (_best_share, _bootstrap_gains, _image_totals,
                                       _image_weights, _resampled_miou)

    sizes = [("VOC val", 1449, 21), ("Cityscapes val", 500, 19), ("ADE20K val", 2000, 150)]
    seeds, points = (3, 4) if quick else (3, 12)
    rng = np.random.default_rng(0)
    print(f"\nsweep statistics: {seeds} seeds, {points} points, 1000 resamples, "
          f"{torch.get_num_threads()} thread(s), load {os.getloadavg()[0]:.2f}")
    for name, images, classes in (sizes[:1] if quick else sizes):
        def confusions():
            return [_image_confusions(rng, images, classes) for _ in range(seeds)]

        base, other = confusions(), confusions()  # the points take turns (memory: ADE20K's
        skips = {f"p{i}": (other, base)[i % 2] for i in range(points)}  # are 1 GB per point)
        n = 1000 if classes < 100 else 100  # the einsum of ADE20K's 150 classes: n=100, x10
        weights = _image_weights(np.random.default_rng(1), images, n)
        t0 = time.perf_counter()
        summed = np.einsum("bn,snij->bsij", weights, np.stack(base).astype(np.float64))
        old = np.nanmean(_iou(summed), axis=-1)
        t1 = time.perf_counter()
        new = _resampled_miou(weights, [_image_totals(m) for m in base])
        t2 = time.perf_counter()
        assert np.array_equal(old, new)
        # as the sweep does it: each run's matrices down to their totals once, then the bootstrap
        totals = {p: [_image_totals(m) for m in ms] for p, ms in {**skips, None: base}.items()}
        per_point = {p: totals[p] for p in skips}
        ci = _bootstrap_gains(per_point, totals[None], n=1000, confidence=0.95, seed=0)
        _best_share(per_point, totals[None], n=1000, seed=0)
        t3 = time.perf_counter()
        assert len(ci) == points
        with tempfile.TemporaryDirectory() as tmp:  # one run's val_confusion: compressed or not
            t4 = time.perf_counter()
            np.save(Path(tmp) / "raw.npy", base[0])
            t5 = time.perf_counter()
            runs.write_confusions(Path(tmp), base[0])
            t6 = time.perf_counter()
            assert np.array_equal(runs.read_confusions(Path(tmp)), base[0])
            t7 = time.perf_counter()
            raw, packed = ((Path(tmp) / f).stat().st_size for f in ("raw.npy", runs.VAL_CONFUSION))
        calls = 2 * points + points + 1  # bootstrap_gain: skip + base; best_share: all + base
        scale = 1000 / n
        print(f"  {name:<15} {images} images x {classes} classes: one call {t1 - t0:7.3f} s "
              f"with einsum{f' at n={n}' if n != 1000 else ''}, {t2 - t1:6.3f} s now "
              f"({(t1 - t0) / (t2 - t1):4.0f}x); the sweep's statistics {t3 - t2:5.1f} s now, "
              f"~{calls * (t1 - t0) * scale:5.0f} s with einsum"
              f"{f' (x{scale:.0f}, from n={n})' if n != 1000 else ''}")
        print(f"  {'':<15} a run's matrices on disk: {raw / 1e6:6.1f} MB .npy in {t5 - t4:.2f} s, "
              f"{packed / 1e6:5.2f} MB .npz in {t6 - t5:.2f} s (read {t7 - t6:.2f} s)")


def _image_confusions(rng, images: int, classes: int):
    """``[images, C, C]`` per-image confusion matrices shaped like a segmentation head's on a
    512 px val set: 5-15 classes per image, each mostly right and confused with 3 others."""
    import numpy as np

    m = np.zeros((images, classes, classes), np.int64)
    for i in range(images):
        shown = rng.choice(classes, int(rng.integers(5, min(16, classes + 1))), replace=False)
        for label, pixels in zip(shown, rng.dirichlet(np.ones(len(shown))) * 512 * 512):
            predicted = np.concatenate([[label], rng.choice(classes, 3, replace=False)])
            np.add.at(m[i, label], predicted, (rng.dirichlet([7, 1, 1, 1]) * pixels).astype(int))
    return m


def sweep_time(tmp: Path, size: int, n_train: int, n_val: int, epochs: int | None,
               device: str, weights: str) -> None:
    from featlab.segment.sweep import sweep

    t_extract = sweep_caches(tmp, size, n_train, n_val, weights)
    sweep_preloads(tmp)
    kwargs = {"epochs": epochs} if epochs else {}
    t1 = time.perf_counter()
    r = sweep(tmp / "train.h5", tmp / "val.h5", "stages", 3, out=tmp / "sweep", progress=False,
              device=device, **kwargs)
    t_sweep = time.perf_counter() - t1
    print(f"\nstages sweep, 3 seeds, {len(r.points) + 1} configurations, {n_train}/{n_val} "
          f"images at {size} px, {r.settings['epochs']} epochs, load "
          f"{os.getloadavg()[0]:.2f}:")
    print(f"  extraction {t_extract:.0f} s + sweep {t_sweep:.0f} s = "
          f"{t_extract + t_sweep:.0f} s wall")
    for row in r.rows():
        print(f"  {row['point']:<10} mIoU {row['miou_mean']:.4f} ± {row['miou_std'] or 0:.4f}"
              f"  gain {row['gain']:+.4f}  > 2 std: {row['beats_2std']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--statistics", action="store_true",
                        help="only the sweep's bootstrap at VOC, Cityscapes and ADE20K val sizes")
    parser.add_argument("--preloads", action="store_true",
                        help="only the sweep's caches and what its runs preload, shared or not")
    parser.add_argument("--device", default="cpu", help="where the heads train: cpu, cuda, ...")
    parser.add_argument("--weights", default="shapes",
                        help="backbone weights (none: where the shapes weights are not made)")
    args = parser.parse_args()
    os.environ.setdefault("FEATLAB_PROGRESS", "0")
    size, n = (64, 64) if args.quick else (args.size, args.images)
    if args.statistics:
        sweep_statistics(args.quick)
        return
    with tempfile.TemporaryDirectory(prefix="featlab-bench-heads-") as tmp:
        if args.preloads:
            sweep_caches(Path(tmp), *((64, 200, 100) if args.quick else (128, 1000, 300)),
                         args.weights)
            sweep_preloads(Path(tmp))
            return
        throughput(Path(tmp), size, n, args.batch_size, args.device, args.weights)
        if not args.no_sweep:
            if args.quick:
                sweep_time(Path(tmp), 64, 200, 100, 2, args.device, args.weights)
            else:
                sweep_time(Path(tmp), 128, 1000, 300, None, args.device, args.weights)


if __name__ == "__main__":
    main()
