"""Resolution of skip points: size, stride, receptive fields, and the resolution ceiling (R-12).

Per skip point, :func:`resolution_table` reports

* the feature-map size and stride (measured from output shapes, see :mod:`featlab.points`),
  and the theoretical receptive field (size, effective stride, effective padding; Araujo et
  al. 2019) from :mod:`featlab.receptive_field`, at any input size when given the model;
* optionally the effective receptive field (Luo et al. 2016, :mod:`featlab.analysis._erf`):
  radii holding 50 % / 90 % of the input-gradient mass of the centre unit, and the map;
* the *resolution ceiling*: with the labels of a data set (a cache's labels), reduce every
  label map to the point's grid and bring it back to full size with nearest neighbour; the
  mIoU of that against the labels (one data-set-level confusion matrix, 255 ignored) is the
  best any predictor whose output lives on that grid can reach. Two reductions:
  ``"nearest"`` (the label at the cell's centre pixel; when that pixel is ignored, the cell's
  majority) and ``"majority"`` (the most frequent non-ignored label of the cell's footprint;
  ties go to the lowest class index). Cell u covers input rows ``[floor(u H / h),
  floor((u+1) H / h))``. Points sharing a grid share one computation.

Examples:
    >>> import featlab.testing as ft
    >>> table = resolution_table(ft.TinyResNet(), input_size=32)
    >>> [(r["point"], r["stride"], r["rf_size"]) for r in table.rows()][-2:]
    [('layer1.0', 2, 11), ('layer1.1', 4, 23)]
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from featlab.analysis._erf import ERF_BATCH, ERFMap, effective_receptive_fields, mass_radius
from featlab.analysis._io import check_keys, write_json_csv
from featlab.runinfo import run_versions
from featlab.errors import ConfigError
from featlab.points import SkipPoint

logger = logging.getLogger("featlab")

__all__ = ["resolution_table", "resolution_ceiling", "reduce_labels", "ResolutionResult",
           "effective_receptive_fields", "ERFMap", "mass_radius", "erf_inputs_from_cache",
           "write_result", "MODES", "ERF_BATCH"]

MODES = ("nearest", "majority")
_LABEL_BATCH = 16


def _footprints(n_in: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Per cell its centre pixel, and per input pixel its cell."""
    starts = np.floor(np.arange(n_cells) * n_in / n_cells).astype(np.int64)
    centres = np.floor((np.arange(n_cells) + 0.5) * n_in / n_cells).astype(np.int64)
    cell_of = np.searchsorted(starts, np.arange(n_in), side="right") - 1
    return centres, cell_of


def reduce_labels(labels: np.ndarray, grid: tuple[int, int], num_classes: int,
                  mode: str = "majority", ignore_index: int | None = 255) -> np.ndarray:
    """Reduce ``[b, H, W]`` label maps to ``[b, h, w]`` cells (``ignore_index`` where a cell
    holds no valid label).

    Examples:
        >>> lab = np.array([[[0, 0, 1, 1], [0, 2, 1, 255], [3, 3, 255, 255], [3, 1, 255, 255]]])
        >>> reduce_labels(lab, (2, 2), 4, "majority").tolist()
        [[[0, 1], [3, 255]]]
        >>> reduce_labels(lab, (2, 2), 4, "nearest").tolist()   # centre pixels (1, 1), (1, 3), ...
        [[[2, 1], [1, 255]]]
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}; got {mode!r}.")
    return _reduce(labels, grid, num_classes, (mode,), ignore_index)[mode]


def _reduce(labels: np.ndarray, grid: tuple[int, int], num_classes: int, modes: Sequence[str],
            ignore_index: int | None) -> dict[str, np.ndarray]:
    """:func:`reduce_labels` for several modes from one count of each cell's labels (the
    nearest mode falls back on the majority where a cell's centre pixel is ignored)."""
    labels = np.asarray(labels)
    if labels.ndim != 3:
        raise ConfigError(f"labels must be [b, H, W]; got shape {labels.shape}.")
    b, hh, ww = labels.shape
    h, w = grid
    if not (1 <= h <= hh and 1 <= w <= ww):
        raise ConfigError(f"the grid must be 1..{hh} x 1..{ww} cells for labels of {hh}x{ww}; "
                          f"got {h}x{w}.")
    ignore = 255 if ignore_index is None else ignore_index
    cy, rows = _footprints(hh, h)
    cx, cols = _footprints(ww, w)
    lab = labels.astype(np.int64)
    valid = lab != ignore if ignore_index is not None else np.ones_like(lab, dtype=bool)
    if valid.any() and (lab[valid].min() < 0 or lab[valid].max() >= num_classes):
        bad = int(lab[valid & ((lab < 0) | (lab >= num_classes))][0])
        raise ConfigError(f"labels must be class indices in [0, {num_classes}) or "
                          f"{ignore_index}; got {bad}. Fix: check num_classes and ignore_index.")
    cell = (np.arange(b)[:, None, None] * h + rows[None, :, None]) * w + cols[None, None, :]
    code = np.where(valid, lab, num_classes)
    counts = np.bincount((cell * (num_classes + 1) + code).ravel(),
                         minlength=b * h * w * (num_classes + 1)).reshape(b, h, w, -1)
    majority = np.where(counts[..., :num_classes].sum(-1) > 0,
                        counts[..., :num_classes].argmax(-1), ignore).astype(np.int64)
    out = {}
    if "majority" in modes:
        out["majority"] = majority
    if "nearest" in modes:
        centre = lab[:, cy][:, :, cx]
        centre_valid = valid[:, cy][:, :, cx]
        out["nearest"] = np.where(centre_valid, centre, majority).astype(np.int64)
    return out


def _upsample(cells: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest: every input pixel takes its cell's value (the footprints of reduce_labels)."""
    _, rows = _footprints(size[0], cells.shape[1])
    _, cols = _footprints(size[1], cells.shape[2])
    return cells[:, rows][:, :, cols]


def resolution_ceiling(labels: Iterable[np.ndarray] | np.ndarray, grids: Sequence[tuple[int, int]],
                       num_classes: int, *, modes: Sequence[str] = MODES,
                       ignore_index: int | None = 255) -> dict[tuple[int, int], dict[str, dict]]:
    """Best mIoU reachable on each grid: reduce labels, upsample (nearest), confusion matrix.

    Args:
        labels: ``[n, H, W]`` class maps, or an iterable of such batches (streamed).
        grids: ``(h, w)`` cell grids (distinct grids are computed once).
        num_classes: C.
        modes: reductions, from :data:`MODES`.
        ignore_index: the ignored label (255), or None.

    Returns:
        ``{grid: {mode: {"miou", "pixel_accuracy", "mean_accuracy", "iou"}}}``.

    Examples:
        >>> lab = np.zeros((1, 8, 8), np.uint8); lab[0, :, 3:] = 1
        >>> out = resolution_ceiling(lab, [(8, 8), (2, 2)], 2, modes=["majority"])
        >>> out[(8, 8)]["majority"]["miou"], round(out[(2, 2)]["majority"]["miou"], 3)
        (1.0, 0.775)
    """
    from featlab.segment.metrics import ConfusionMatrix

    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ConfigError(f"modes must be a non-empty subset of {MODES}; got {list(modes)}.")
    grids = list(dict.fromkeys(tuple(int(v) for v in g) for g in grids))
    cms = {(g, m): ConfusionMatrix(num_classes, ignore_index) for g in grids for m in modes}
    batches = [labels] if isinstance(labels, np.ndarray) else labels
    for batch in batches:
        batch = np.asarray(batch)
        size = batch.shape[1:]
        target = batch.astype(np.int64)
        for g in grids:
            for m, cells in _reduce(batch, g, num_classes, modes, ignore_index).items():
                cms[(g, m)].update(_upsample(cells, size), target)
    return {g: {m: {"miou": cms[(g, m)].miou(), "pixel_accuracy": cms[(g, m)].pixel_accuracy(),
                    "mean_accuracy": cms[(g, m)].mean_accuracy(),
                    "iou": [float(v) for v in cms[(g, m)].iou()]} for m in modes}
            for g in grids}


@dataclass(frozen=True, eq=False)
class ResolutionResult:
    """Geometry, ceilings and effective receptive fields of skip points.

    Attributes:
        points: the :class:`SkipPoint` records (execution order).
        input_size: (H, W) the sizes were measured at.
        ceiling: ``{point: {mode: {"miou", "pixel_accuracy", "mean_accuracy", "iou"}}}``
            (empty without labels), on the grid the features live on: a cache's stored grid.
        stored: ``{point: [h, w]}`` of the points a cache stores pooled (``--max-size``): their
            ceiling is computed on that grid, what probes and CKA of the cache see.
        erf: ``{point: ERFMap}`` (empty unless requested).
        num_images: label maps used for the ceiling.
        num_classes, ignore_index: of the labels.
        settings: modes, ERF image count.
        cache: identity of the input cache, or None.
        versions: featlab / torch / numpy versions.
    """

    points: list[SkipPoint]
    input_size: tuple[int, int] | None
    ceiling: dict = field(default_factory=dict)
    erf: dict = field(default_factory=dict)
    num_images: int = 0
    num_classes: int | None = None
    ignore_index: int | None = 255
    settings: dict = field(default_factory=dict)
    cache: dict | None = None
    versions: dict = field(default_factory=dict)
    stored: dict = field(default_factory=dict)


    def __repr__(self) -> str:  # one line: the table is rows()
        erf = next(iter(self.erf.values())).num_images if self.erf else 0
        return (f"ResolutionResult({len(self.points)} points, {self.num_images} label maps, "
                f"ERF on {erf} images)")

    def rows(self) -> list[dict]:
        """One dict per point: ``point, index, channels, size`` (cells along H; ``width``
        along W), ``stride, rf_size, rf_stride, rf_padding, rf_status``, ``stored_size`` and
        ``stored_width`` when any point is stored pooled, and when available ``ceiling_miou``
        (the best over the reductions), ``ceiling_miou_<mode>``,
        ``ceiling_pixel_accuracy_<mode>``, ``erf_radius50``, ``erf_radius90``."""
        out = []
        for p in self.points:
            row = {"point": p.name, "index": p.index, "channels": p.channels, "size": p.size[0],
                   "width": p.size[1], "stride": p.stride, "rf_size": p.rf_size,
                   "rf_stride": p.rf_stride, "rf_padding": p.rf_padding,
                   "rf_status": p.rf_status}
            if self.stored:
                row["stored_size"], row["stored_width"] = self.stored.get(p.name, p.size)
            ceil = self.ceiling.get(p.name)
            if ceil:
                row["ceiling_miou"] = max(v["miou"] for v in ceil.values())
                for mode, v in ceil.items():
                    row[f"ceiling_miou_{mode}"] = v["miou"]
                    row[f"ceiling_pixel_accuracy_{mode}"] = v["pixel_accuracy"]
            if p.name in self.erf:
                row["erf_radius50"] = self.erf[p.name].radius50
                row["erf_radius90"] = self.erf[p.name].radius90
            out.append(row)
        return out

    def to_dict(self, with_maps: bool = True) -> dict:
        d = {k: getattr(self, k) for k in _KEYS}
        d["points"] = [{**p.to_dict(), "rf_status": p.rf_status} for p in self.points]
        d["input_size"] = None if self.input_size is None else list(self.input_size)
        d["erf"] = {k: v.to_dict(with_maps) for k, v in self.erf.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ResolutionResult:
        d = {"stored": {}, **d}  # results written before featlab recorded it
        check_keys("ResolutionResult", d, _KEYS)
        d["points"] = [SkipPoint.from_dict(p) for p in d["points"]]
        d["input_size"] = None if d["input_size"] is None else tuple(d["input_size"])
        d["erf"] = {k: ERFMap.from_dict(v) for k, v in d["erf"].items()}
        return cls(**d)


_KEYS = ("points", "input_size", "ceiling", "erf", "num_images", "num_classes", "ignore_index",
         "settings", "cache", "versions", "stored")


def _label_batches(labels: Any, n: int) -> Iterable[np.ndarray]:
    for start in range(0, n, _LABEL_BATCH):
        yield np.asarray(labels[start:start + _LABEL_BATCH])


def resolution_table(source: Any, *, input_size: int | tuple[int, int] | None = None,
                     labels: Any = None, num_classes: int | None = None,
                     ignore_index: int | None = 255, modes: Sequence[str] = MODES,
                     model: nn.Module | None = None, images: Any = None,
                     device: str | torch.device | None = None, progress: bool = True
                     ) -> ResolutionResult:
    """Per skip point: size, stride, receptive fields, resolution ceiling, and optionally ERF.

    Args:
        source: a cache (reader or path: its points, labels, classes and input size), a model
            (its points measured with :func:`featlab.skip_points` at ``input_size``), or a list
            of :class:`SkipPoint` records.
        input_size: input side or (H, W) when ``source`` is a model (default 224).
        labels: ``[n, H, W]`` label maps (array or lazy cache array) for the ceiling; default
            the cache's labels. None with a model / point list: no ceiling.
        num_classes: C (default: the cache's class count).
        ignore_index: label ignored everywhere (default 255; the cache's value for a cache).
        modes: label reductions for the ceiling (:data:`MODES`).
        model: a network for the effective receptive field (with ``images``); a model
            ``source`` is used when ``images`` are given.
        images: normalised inputs ``[n, 3, H, W]`` (or an iterable of batches) for the ERF.
        device: where the ERF passes run (default: cuda when available).
        progress: tqdm bars.

    Returns:
        A :class:`ResolutionResult`; ``rows()`` for tables.
    """
    from featlab.distributed import resolve_device

    started = time.perf_counter()
    dev = resolve_device(device)  # a device this machine lacks fails before any work
    cache = None
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from featlab.cache.reader import open_cache

        source = open_cache(source)
    if hasattr(source, "labels") and hasattr(source, "points"):
        cache = source
        points, size = cache.points, tuple(cache.input_size) or None
        labels = cache.labels if labels is None else labels
        num_classes = num_classes or len(cache.classes) or None
        ignore_index = cache.ignore_index if cache.ignore_index is not None else ignore_index
    elif isinstance(source, nn.Module):
        from featlab.points import skip_points

        size = input_size if input_size is not None else 224
        size = (size, size) if isinstance(size, int) else tuple(size)
        points = skip_points(source, size)
        model = source if model is None else model
    elif isinstance(source, Sequence) and all(isinstance(p, SkipPoint) for p in source):
        points = list(source)
        size = None if input_size is None else (
            (input_size, input_size) if isinstance(input_size, int) else tuple(input_size))
    else:
        raise ConfigError(f"source must be a cache, a cache path, a model or a list of SkipPoint; "
                          f"got {type(source).__name__}. Fix: e.g. resolution_table("
                          "featlab.open_cache('val.h5')).")
    # the grid each point's features live on: a cache's stored one (pooled by --max-size or not)
    grids = {p.name: tuple(p.size) if cache is None else tuple(cache.stored_size(p.name))
             for p in points}
    stored = {p.name: list(grids[p.name]) for p in points if grids[p.name] != tuple(p.size)}
    ceiling: dict = {}
    n_images = 0
    if labels is not None:
        if not num_classes:
            raise ConfigError("num_classes must be given to compute the resolution ceiling from "
                              "labels; got None. Fix: pass num_classes=len(classes).")
        n_images = len(labels)
        by_grid = resolution_ceiling(_label_batches(labels, n_images), list(grids.values()),
                                     num_classes, modes=modes, ignore_index=ignore_index)
        ceiling = {name: by_grid[g] for name, g in grids.items()}
    erf: dict = {}
    if images is not None:
        if model is None:
            raise ConfigError("the effective receptive field needs the model; got images but no "
                              "model. Fix: pass model=... (the network the points belong to).")
        erf = effective_receptive_fields(model, images, points, device=dev, progress=progress)
    settings = {"modes": list(modes), "erf_images": next(iter(erf.values())).num_images
                if erf else 0}
    result = ResolutionResult(points, size, ceiling, erf, n_images, num_classes, ignore_index,
                              settings, None if cache is None else cache.identity(),
                              run_versions(dev if erf else "cpu"), stored)  # where it ran
    logger.info("resolution table of %d points (%d label maps, ERF on %d images) in %.2f s",
                len(points), n_images, settings["erf_images"], time.perf_counter() - started)
    return result


def erf_inputs_from_cache(cache: Any, num_images: int = 16) -> tuple[nn.Module, torch.Tensor]:
    """Rebuild the cache's backbone and read its first ``num_images`` stored images, normalised
    as the cache's weights expect, for :func:`effective_receptive_fields`.

    Raises:
        ConfigError: the cache stores no images (extract with ``save_images=True``).
        CacheError: the backbone cannot be rebuilt with the same weights identity.
    """
    from featlab.errors import CacheError
    from featlab.models import get_backbone

    if not cache.has_images:
        raise ConfigError(f"the effective receptive field needs the input images; "
                          f"{str(cache.path)!r} stores none. Fix: extract with --save-images, "
                          "or leave out --erf.")
    spec = cache.model or {}
    weights = str(spec.get("weights", "none"))
    kind, _, rest = weights.partition(":")
    request = rest if kind == "file" else kind
    try:
        model, built = get_backbone(spec["name"], weights=request, seed=spec.get("seed") or 0)
    except (KeyError, OSError, ValueError) as err:
        raise CacheError(f"the effective receptive field needs the cache's backbone; rebuilding "
                         f"{spec.get('name')!r} with weights {weights!r} failed ({err}). Fix: "
                         "call resolution_table(points, model=..., images=...) yourself.") from err
    if built.weights != weights:
        raise CacheError(f"the effective receptive field needs the cache's weights {weights!r}; "
                         f"the local ones are {built.weights!r}. Fix: pass the model yourself.")
    n = min(num_images, len(cache))
    images = torch.from_numpy(np.asarray(cache.images[:n])).float() / 255.0
    mean = torch.tensor(spec["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(spec["std"]).view(1, 3, 1, 1)
    return model, (images - mean) / std


def write_result(result: ResolutionResult, stem, *, force: bool = False) -> list:
    """Write ``<stem>.json`` (:meth:`ResolutionResult.to_dict`, ERF maps included) and
    ``<stem>.csv`` (:meth:`ResolutionResult.rows`)."""
    return write_json_csv(result.to_dict(), result.rows(), stem, force=force)
