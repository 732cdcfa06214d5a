"""``featlab.extract``: stream skip-point activations of a data set into an HDF5 cache.

The main thread loads batches in the data set's sorted order (a ``DataLoader`` with workers;
no shuffling, R-5.3), runs the model in eval mode under ``torch.inference_mode`` (checked at
every batch, R-7.1), and lets :class:`~featlab.cache.taps.Taps` pool, cast and copy each point
into preallocated host buffers on the device that computed it. A writer thread -- the only
thread that calls h5py while samples stream -- writes each batch's rows, flushes, flags them
written and flushes again, then hands the buffers back. A bounded queue between the two keeps
memory flat in N (R-4.2) and overlaps compute with writing; an error in the writer thread is
raised in the main thread. Killed at any instant, the same call resumes where the flags say
(batches stay aligned, so recomputed rows equal an uninterrupted run's); under ``torchrun`` each
rank writes a shard and rank 0 joins them with HDF5 virtual datasets.

Examples:
    >>> import tempfile, os, featlab, featlab.testing as ft
    >>> from featlab.models import BackboneSpec
    >>> net = ft.TinyCNN()
    >>> spec = BackboneSpec("tiny", "none", (0.5,) * 3, (0.25,) * 3, 32, 10)
    >>> ds = featlab.load_dataset("shapes", "val", size=32, length=6)
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     r = extract(net, ds, "stages", os.path.join(tmp, "val.h5"), spec=spec, batch_size=4,
    ...                 progress=False, num_workers=0)
    >>> r.points, r.num_samples, r.written
    (('features.2', 'features.5'), 6, 6)
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from featlab import distributed as fdist
from featlab.cache import files, h5file, merge
from featlab.cache.plan import ExtractPlan, format_bytes, free_disk_bytes
from featlab.cache.setup import Job, prepare_job
from featlab.cache.stream import stream
from featlab.cache.verify import underflow_message, underflow_summary
from featlab.errors import CacheError, ConfigError, FeatlabWarning

__all__ = ["extract", "estimate", "ExtractResult"]

log = logging.getLogger("featlab")


@dataclass(frozen=True)
class ExtractResult:
    """What one :func:`extract` call did.

    Attributes:
        path: the cache file.
        points: point names stored, execution order.
        num_samples: N in the cache.
        written: samples computed and written by this call (all ranks).
        skipped: samples already in a partial cache (resumed), not recomputed.
        bytes: size of the cache on disk (the file, plus its shards when sharded).
        seconds: wall time of the call.
        images_per_s: ``written / seconds``.
        mb_per_s: bytes of rows written by this call per second, in MB (10^6 bytes).
        nonfinite: ``(point, sample id, count)`` for every stored array holding NaN/Inf.
        underflow: ``(point, samples, all zero, checked)`` for every float16 point whose first
            samples (8 per rank) include some with no value in float16's normal range
            (``featlab.cache.verify.float16_underflow``); a warning names the points where they
            are at least half.
    """

    path: str
    points: tuple[str, ...]
    num_samples: int
    written: int
    skipped: int
    bytes: int
    seconds: float
    images_per_s: float
    mb_per_s: float
    nonfinite: tuple[tuple[str, str, int], ...] = ()
    underflow: tuple[tuple[str, int, int, int], ...] = ()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["points"] = list(self.points)
        d["nonfinite"], d["underflow"] = ([list(t) for t in self.nonfinite],
                                          [list(t) for t in self.underflow])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExtractResult:
        names = {f.name for f in fields(cls)}
        if set(d) - names:
            raise ConfigError(f"ExtractResult keys must be among {sorted(names)}; got unknown "
                              f"{sorted(set(d) - names)}. Fix: use the output of to_dict().")
        return cls(**{**d, "points": tuple(d["points"]),
                      "nonfinite": tuple(tuple(t) for t in d.get("nonfinite", ())),
                      "underflow": tuple(tuple(t) for t in d.get("underflow", ()))})


def extract(model: nn.Module, dataset: Any, points: Any = "stages", path: str | os.PathLike =
            "cache.h5", *, spec: Any = None, batch_size: int = 32, dtype: str = "float16",
            error_stat: str = "bound", max_size: int | None = None, limit: int | None = None,
            max_channels: int | None = None, channel_seed: int = 0, save_images: bool = False,
            compression: str | None = None, device: str | torch.device | None = None,
            num_workers: int | None = None, force: bool = False, disk_check: bool = True,
            progress: bool = True, queue_size: int = 2, stop_early: bool = True
            ) -> ExtractResult:
    """Write the activations of ``points`` over ``dataset`` into the HDF5 cache ``path``.

    Args:
        model: the backbone (``DataParallel``/DDP are unwrapped; it is run in eval mode and left
            in the training mode and on the device it came with).
        dataset: a featlab data set (``load_dataset``): samples in ``dataset.ids`` order, all of
            one size (the network input size).
        points: a selection of skip points (``"stages"``, ``"all"``, ``"layer3.*"``, names, or
            ``SkipPoint`` records), resolved at the data set's input size.
        path: the cache file (written as ``path + ".partial"`` until complete).
        spec: the :class:`~featlab.models.BackboneSpec` whose normalization the weights expect;
            default ``model.featlab_spec`` (set by ``get_backbone``).
        batch_size: samples per forward (not part of the cache identity).
        dtype: ``"float16"`` (half the size; the rounding error is recorded) or ``"float32"``.
        error_stat: the float16 rounding error recorded per sample and point in
            ``/stats/abs_error``: ``"bound"``, half the float16 spacing at the largest stored
            magnitude (the most rounding can have changed any value; recomputable from the
            file), or ``"exact"``, max |x - stored| (a few % slower on the CPU).
        max_size: area-pool each point to at most this many cells per side (None: full size).
        limit: store only the first ``limit`` samples of the sorted order.
        max_channels: store at most this many channels of each point (None: all): a random
            subset, sorted, the same for a point whatever else is extracted, recorded as the
            ``channels`` attribute of its dataset (:func:`~featlab.cache.plan.channel_subset`).
        channel_seed: the seed of those subsets.
        save_images: also store the input images (uint8).
        compression: ``"lzf"`` or ``"gzip"`` to compress points, labels and images when the
            cache is finalised (None: uncompressed, the default). The samples stream into an
            uncompressed partial file as always; at the end it is copied compressed, which takes
            a pass over the cache and, meanwhile, up to its size again on disk.
        device: default ``cuda:<LOCAL_RANK>`` when CUDA is available, else ``cpu``.
        num_workers: data loader workers (default: a few, by CPU count).
        force: delete an existing cache (complete or partial) and start over.
        disk_check: refuse to start when the free disk space cannot hold what remains.
        progress: a tqdm progress bar (also off with ``FEATLAB_PROGRESS=0``).
        queue_size: computed batches that may wait for the writer thread.
        stop_early: end each forward after the deepest point (R-4.4).

    Returns:
        An :class:`ExtractResult` (also summarised in one log line).

    Raises:
        CacheError: ``path`` exists and is complete (without ``force``), a partial cache there
            has other settings (the message names the setting), another extraction is writing
            ``path`` (``force`` too is refused then), the folder is not writable, the disk is
            too small or a write fails (the partial cache stays resumable).
        ConfigError: bad arguments, no spec, samples of different sizes.
    """
    started = time.perf_counter()
    job = prepare_job(model, dataset, points, path, spec=spec, batch_size=batch_size,
                      dtype=dtype, error_stat=error_stat, max_size=max_size, limit=limit,
                      max_channels=max_channels, channel_seed=channel_seed,
                      save_images=save_images, compression=compression, device=device,
                      num_workers=num_workers, force=force, queue_size=queue_size)
    info = job.info
    # one extraction at a time per cache: every rank locks before any file is looked at
    lock, failure = _attempt(files.OutLock, job.paths.out, info.rank, info.world_size)
    try:
        _together(info, failure, None)
        result = _extract_locked(job, started, force=force, disk_check=disk_check,
                                 progress=progress, stop_early=stop_early)
    finally:
        if lock is not None:
            lock.release()
    if info.is_main:
        _report(result, job)
    return result


def _extract_locked(job: Job, started: float, *, force: bool, disk_check: bool, progress: bool,
                    stop_early: bool) -> ExtractResult:
    """:func:`extract` once the cache's lock is held: the files, the stream, the result."""
    info = job.info
    if force:
        _, failure = _attempt(files.remove_all, job.paths) if info.is_main else (None, None)
        _together(info, failure, None)
    # Every rank reaches every collective below whatever fails on it: a failure travels with the
    # gathered values, so no rank waits forever on one that gave up.
    resume, failure = _attempt(files.prepare, job.paths, job.settings)
    rows = len(job.shard)
    written = np.zeros(rows, np.uint8) if resume is None else resume[1]
    todos = _together(info, failure, int(rows - written.sum()))
    local, failure = _attempt(_run_rank, job, resume, written, sum(todos), disk_check=disk_check,
                              progress=progress, stop_early=stop_early)
    gathered = _together(info, failure, local)
    if info.world_size > 1:
        assembled, failure = None, None
        if info.is_main and not os.path.exists(job.paths.out):
            assembled, failure = _attempt(_assemble, job)
        _together(info, failure, assembled)
    written = sum(g["written"] for g in gathered)
    findings = tuple(sorted((tuple(f) for g in gathered for f in g["nonfinite"]),
                            key=lambda f: (f[1], f[0])))
    underflow: dict[str, list[int]] = {}
    for g in gathered:  # summed over the ranks' shards
        for name, *counts in g["underflow"]:
            underflow[name] = [a + b for a, b in zip(underflow.get(name, [0, 0, 0]), counts)]
    size = os.path.getsize(job.paths.out) + sum(
        os.path.getsize(p) for p in job.paths.shard_files() if info.world_size > 1)
    seconds = time.perf_counter() - started
    return ExtractResult(
        job.paths.out, job.settings.points, job.settings.num_samples, written,
        sum(g["skipped"] for g in gathered), size, seconds, written / seconds,
        written * job.plan.bytes_per_sample / seconds / 1e6, findings,
        tuple((name, *counts) for name, counts in underflow.items()))


def estimate(model: nn.Module, dataset: Any, points: Any = "stages",
             path: str | os.PathLike = "cache.h5", *, spec: Any = None, batch_size: int = 32,
             dtype: str = "float16", max_size: int | None = None, limit: int | None = None,
             max_channels: int | None = None, channel_seed: int = 0, save_images: bool = False,
             compression: str | None = None, device: str | torch.device | None = None,
             num_workers: int | None = None, queue_size: int = 2, force: bool = False
             ) -> ExtractPlan:
    """What :func:`extract` with the same arguments would store, without writing anything.

    This is ``featlab extract --dry-run``: the skip points are measured (a forward at batch 1)
    and the data set's first sample read; nothing is written and no process group is joined.

    Returns:
        The :class:`~featlab.cache.plan.ExtractPlan`: per point the stored shape and bytes, the
        totals for N, the host memory in flight, the free disk space at ``path``, and what the
        run would do with files already there (``existing``: refuse, resume, replace, or with
        ``force`` delete them).

    Examples:
        >>> import featlab, featlab.testing as ft
        >>> from featlab.models import BackboneSpec
        >>> spec = BackboneSpec("tiny", "none", (0.5,) * 3, (0.25,) * 3, 32, 10)
        >>> ds = featlab.load_dataset("shapes", "val", size=32, length=10)
        >>> plan = estimate(ft.TinyCNN(), ds, "stages", "unused.h5", spec=spec, max_size=4)
        >>> [(p.name, p.stored_size, p.bytes_per_sample) for p in plan.points]
        [('features.2', (4, 4), 256), ('features.5', (4, 4), 512)]
    """
    job = prepare_job(model, dataset, points, path, spec=spec, batch_size=batch_size,
                      dtype=dtype, max_size=max_size, limit=limit, max_channels=max_channels,
                      channel_seed=channel_seed, save_images=save_images,
                      compression=compression, device=device, num_workers=num_workers,
                      queue_size=queue_size, probe=False)
    return replace(job.plan, existing=files.outlook(job.paths, job.settings, force))


# ----------------------------------------------------------------------------- one rank
def _attempt(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, Exception | None]:
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - handed to _together, which raises it
        return None, err


def _together(info: fdist.DistInfo, failure: Exception | None, value: Any) -> list[Any]:
    """Every rank's ``value`` in rank order; raises this rank's failure, or a CacheError naming
    the ranks that failed."""
    if info.world_size == 1:
        if failure is not None:
            raise failure
        return [value]
    try:
        gathered = fdist.all_gather_object(
            (None, value) if failure is None else (f"{type(failure).__name__}: {failure}", None))
    except RuntimeError as err:  # torch's DistBackendError is one
        if failure is not None or "timed out" not in str(err).lower():
            raise
        raise CacheError(f"every rank must reach this point within {fdist.timeout_seconds():.0f} "
                         f"s of the others; rank {info.rank} waited longer. Fix: re-run the same "
                         "command (finished shards are kept, partial ones resume), with "
                         "FEATLAB_DIST_TIMEOUT=SECONDS larger when ranks run at different speeds "
                         "(e.g. ranks sharing a GPU).") from None
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, (message, _) in enumerate(gathered) if message]
    if failed:
        rank, message = failed[0]
        raise CacheError(f"every rank must succeed; rank {rank} failed ({message}). Fix: see "
                         "that rank's error, then re-run the same command: finished shards are "
                         "kept and partial ones resume.")
    return [v for _, v in gathered]


def _run_rank(job: Job, resume: tuple[str, np.ndarray] | None, written: np.ndarray,
              todo_all: int, *, disk_check: bool, progress: bool, stop_early: bool) -> dict:
    paths, plan = job.paths, job.plan
    todo = int(len(written) - written.sum())
    # every rank's remaining rows (conservative when the ranks write to different disks)
    metadata = plan.total_bytes - plan.bytes_per_sample * plan.num_samples
    need = todo_all * plan.bytes_per_sample + (metadata if resume is None else 0)
    need += plan.disk_bytes - plan.total_bytes  # with compression: the copy made at the end
    free = free_disk_bytes(paths.target)
    if disk_check and todo and need > free:
        smaller = "--dtype float16, " if job.settings.dtype == "float32" else ""
        raise CacheError(f"the disk at {os.path.dirname(paths.target)} must hold the cache; it "
                         f"needs {format_bytes(need)} more and has {format_bytes(free)} free. "
                         f"Fix: free space or choose another --out; shrink it with {smaller}"
                         "--max-size, --max-channels or --limit (see --dry-run); or "
                         "--no-disk-check.")
    if resume is None:
        h5file.create(paths.partial, job.layout, job.attrs, job.ids, job.index)
        current = paths.partial
    else:
        current = resume[0]
        if todo:
            h5file.record_resume(current, job.info.rank, len(written) - todo, len(written),
                                 job.device)
    if todo:
        stream(job, current, written, progress=progress, stop_early=stop_early)
    if current == paths.partial:
        h5file.finalize(paths.partial, paths.target, plan.compression,
                        progress=progress and job.info.is_main,
                        finished=h5file.finished_record(job.info.rank, todo, len(written),
                                                        job.device))
    counts, ids, names = h5file.read_nonfinite(paths.target)
    found = [(names[p], str(ids[r]), int(counts[r, p])) for r in range(len(ids))
             for p in np.flatnonzero(counts[r])]
    return {"written": todo, "skipped": len(written) - todo, "nonfinite": found,
            "underflow": underflow_summary(paths.target)}


# ----------------------------------------------------------------------------- ends
def _assemble(job: Job) -> None:
    merge.assemble(job.paths.shard_files(), job.paths.out)


def _report(result: ExtractResult, job: Job) -> None:
    names = result.points
    shown = ", ".join(names) if len(names) <= 6 else f"{', '.join(names[:5])}, ... ({len(names)})"
    rates = (f"{result.images_per_s:.1f} img/s, {result.mb_per_s:.1f} MB/s; "
             if result.written else "")  # e.g. only the compression of a finished file
    log.info("extracted %d points (%s) x %d samples: %s %s -> %s in %.1f s (%s%d written now, %d "
             "already there)", len(names), shown, result.num_samples, format_bytes(result.bytes),
             job.settings.dtype, result.path, result.seconds, rates, result.written,
             result.skipped)
    if result.nonfinite:
        listed = "; ".join(f"{p!r} in sample {s!r} ({c} values)" for p, s, c in
                           result.nonfinite[:5])
        more = f"; and {len(result.nonfinite) - 5} more" if len(result.nonfinite) > 5 else ""
        warnings.warn(
            f"stored activations must be finite; got NaN/Inf in {len(result.nonfinite)} (point, "
            f"sample) pairs of {result.path}: {listed}{more}. They are stored as computed and "
            "counted in /stats/nonfinite. Fix: check the model and inputs; with float16, values "
            "beyond +-65504 overflow (use dtype float32).", FeatlabWarning, stacklevel=3)
    for name, tiny, zero, checked in result.underflow:
        if 2 * tiny >= checked:
            warnings.warn(f"float16 storage must keep the activations' precision; in "
                          f"{result.path}, {underflow_message(name, tiny, zero, checked)}",
                          FeatlabWarning, stacklevel=3)

