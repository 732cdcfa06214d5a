"""The cache-aware part of :func:`featlab.analysis.similarity.cka_matrix`: read, represent, CKA."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np

from featlab.analysis._cka_estimators import choose_form
from featlab.runinfo import run_versions
from featlab.analysis._representations import (SPATIAL, batch_plan, represent,
                                               rescale_positions, sample_positions)
from featlab.analysis.similarity import (_MAX_BYTES, KINDS, CKAResult, MinibatchAccumulator,
                                         cka_arrays)
from featlab.errors import ConfigError

logger = logging.getLogger("featlab")

_READ_BATCH = 64   # images per read in the full (non-minibatch) kinds


def _open(cache: Any):
    if isinstance(cache, (str, os.PathLike)):
        from featlab.cache.reader import open_cache

        return open_cache(cache)
    return cache


def _check_settings(kind: str, spatial: str, estimator: str | None, bandwidth: float
                    ) -> str:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}; got {kind!r}. Fix: --kind linear.")
    if spatial not in SPATIAL:
        raise ConfigError(f"spatial must be one of {SPATIAL}; got {spatial!r}. Fix: 'gap' "
                          "(pool each map), 'flatten' (whole map) or 'pixels' (positions).")
    if kind == "minibatch":
        if estimator not in (None, "debiased"):
            raise ConfigError(f"minibatch CKA uses the unbiased HSIC estimator; got estimator="
                              f"{estimator!r}. Fix: drop estimator or use kind='linear'.")
        return "debiased"
    if estimator not in (None, "biased", "debiased"):
        raise ConfigError(f"estimator must be 'biased' or 'debiased'; got {estimator!r}.")
    if not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
        raise ConfigError(f"bandwidth must be a number > 0 (a fraction of the median "
                          f"distance); got {bandwidth!r}. Fix: e.g. 1.0.")
    return estimator or "biased"


class _Side:
    """One cache, its chosen points and, for ``pixels``, the sampled input positions."""

    def __init__(self, cache, names: list[str], spatial: str, coords: np.ndarray | None):
        self.cache, self.names, self.spatial, self.coords = cache, names, spatial, coords
        self.points = [cache.point(n) for n in names]
        self.input_size = tuple(cache.input_size)
        self.alignment: dict[str, str] = {}

    def widths(self) -> list[int]:
        out = []
        for p in self.points:
            c, (h, w) = len(self.cache.stored_channels(p.name)), self.cache.stored_size(p.name)
            out.append(c * h * w if self.spatial == "flatten" else c)
        return out

    def represent(self, rows: np.ndarray, data: dict[str, np.ndarray]) -> list[np.ndarray]:
        reps = []
        for p in self.points:
            coords = None if self.coords is None else self.coords[rows]
            x, how = represent(data[p.name], self.spatial, point=p, coords=coords,
                               input_size=self.input_size)
            if how is not None:
                self.alignment[p.name] = how
            reps.append(x)
        return reps

    def read(self, rows: np.ndarray) -> list[np.ndarray]:
        return self.represent(rows, {n: self.cache[n][rows] for n in self.names})


def default_max_bytes() -> int:
    """What CKA may hold: 80 % of the memory this process may still allocate (the machine's,
    or its job's cgroup limit), or 8 GiB where that cannot be read."""
    from featlab.allocator import memory_budget

    return memory_budget() or _MAX_BYTES


def _check_memory(what: str, held: str, need: int, max_bytes: int, fix: str) -> None:
    if need > max_bytes:
        raise ConfigError(f"{what} (max_bytes={max_bytes:,}); {held} need about {need:,} "
                          f"bytes. Fix: {fix}; or a larger max_bytes (--max-bytes) where the "
                          "memory is there.")


def cka_matrix(cache: Any, cache2: Any = None, kind: str = "linear", *, points: Any = None,
               points2: Any = None, spatial: str = "gap", estimator: str | None = None,
               form: str = "auto", bandwidth: float = 1.0, batch_size: int = 256,
               positions: int = 16, seed: int = 0, device: Any = None, progress: bool = True,
               max_bytes: int | None = None) -> CKAResult:
    """See :func:`featlab.analysis.similarity.cka_matrix`."""
    from tqdm.auto import tqdm

    from featlab.cache.joins import check_same_samples
    from featlab.distributed import resolve_device
    from featlab.runinfo import progress_enabled

    started = time.perf_counter()
    estimator = _check_settings(kind, spatial, estimator, bandwidth)
    if max_bytes is None:
        max_bytes = default_max_bytes()
    elif isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) \
            or max_bytes < 1:
        raise ConfigError(f"max_bytes must be an int >= 1 (bytes); got {max_bytes!r}. Fix: e.g. "
                          "max_bytes=12 << 30 (--max-bytes 12G), or None for 80 % of the memory "
                          "available.")
    device = resolve_device(device)
    a = _open(cache)
    b = None if cache2 is None else _open(cache2)
    if b is not None:
        check_same_samples(a, b)
    n = len(a)
    if n < 2:
        raise ConfigError(f"CKA needs at least 2 samples; {str(a.path)!r} has {n}.")
    coords = coords2 = None
    if spatial == "pixels":
        coords = sample_positions(n, tuple(a.input_size), positions, seed)
        if b is not None:
            coords2 = rescale_positions(coords, tuple(a.input_size), tuple(b.input_size))
    side_a = _Side(a, a.select(points), spatial, coords)
    side_b = None if b is None else _Side(b, b.select(points if points2 is None else points2),
                                          spatial, coords2)
    per_image = positions if spatial == "pixels" else 1
    show = progress_enabled(progress)
    widths = side_a.widths() + ([] if side_b is None else side_b.widths())
    if kind == "minibatch":
        plan = batch_plan(n, batch_size, seed)
        largest = max(len(rows) for rows in plan) * per_image
        _check_memory("minibatch CKA must fit one batch's float64 representations in memory",
                      f"a batch of {largest} samples x {len(widths)} points",
                      8 * largest * sum(widths), max_bytes,
                      "spatial='gap', a smaller batch_size, or fewer points")
        acc = MinibatchAccumulator(device)
        for rows in tqdm(plan, desc="minibatch CKA", unit="batch", disable=not show):
            acc.update(side_a.read(rows), None if side_b is None else side_b.read(rows),
                       form=form)
        matrix, reasons = acc.result(side_a.names, (side_b or side_a).names)
        used_form = acc.form
    else:
        samples = n * per_image
        planned = form if form != "auto" else choose_form(
            samples, side_a.widths(), None if side_b is None else side_b.widths())
        # each representation and its centred copy; the feature form also joins them in one
        need = 8 * samples * sum(widths) * (3 if planned == "feature" and kind != "rbf" else 2)
        if kind == "rbf" or planned == "gram":   # one n x n float64 Gram matrix per point
            need += 8 * samples * samples * len(widths)
        _check_memory(f"{kind} CKA must fit its float64 matrices in memory",
                      f"{samples} samples x {len(widths)} points", need, max_bytes,
                      "use kind='minibatch' (memory bounded by the batch), spatial='gap', fewer "
                      "points, or fewer positions")
        # one float64 array per point, filled batch by batch: no second copy to concatenate
        xs = [np.empty((samples, w)) for w in side_a.widths()]
        ys = None if side_b is None else [np.empty((samples, w)) for w in side_b.widths()]
        total = -(-n // _READ_BATCH)
        for side, store in ((side_a, xs), (side_b, ys)):
            if side is None:
                continue
            done = 0
            for batch in tqdm(side.cache.batches(side.names, _READ_BATCH, labels=False),
                              total=total, desc=f"reading {os.path.basename(side.cache.path)}",
                              unit="batch", disable=not show):
                reps = side.represent(np.asarray(batch["rows"]), batch)
                for array, x in zip(store, reps):
                    array[done:done + len(x)] = x
                done += len(reps[0])
        matrix, reasons, used_form = cka_arrays(
            xs, ys, kernel="rbf" if kind == "rbf" else "linear",
            estimator=estimator, form=form, bandwidth=bandwidth, device=device,
            names=side_a.names, names2=None if side_b is None else side_b.names)
    settings = {"seed": seed, "form_requested": form}
    if kind == "minibatch":
        settings["batch_size"] = batch_size
    if kind == "rbf":
        settings["bandwidth"] = float(bandwidth)
    if spatial == "pixels":
        settings["positions"] = positions
        settings["alignment"] = {**side_a.alignment,
                                 **({f"b:{k}": v for k, v in side_b.alignment.items()}
                                    if side_b else {})}
    for key, reason in reasons.items():
        logger.warning("CKA undefined for %s: %s", key, reason)
    result = CKAResult(side_a.names, (side_b or side_a).names, matrix, kind, estimator, spatial,
                       used_form, n * per_image, n, settings, reasons, a.identity(),
                       None if b is None else b.identity(), run_versions(device))
    logger.info("%s CKA (%s, %s) of %d x %d points over %d samples in %.2f s", kind, estimator,
                spatial, len(result.names), len(result.columns), result.num_samples,
                time.perf_counter() - started)
    return result
