"""Linear separability of every skip point: per-pixel linear probes on cached features.

:class:`~featlab.analysis.pixel_probe.PixelProbe` (re-exported here) is the estimator;
:func:`probe_points` fits one per selected point on a train-split cache and scores it on a
val-split cache: pixel accuracy, mean class accuracy, mIoU and per-class IoU from one
data-set-level confusion matrix at full label resolution (logits upsampled bilinearly; ignore
index 255). Two null baselines (R-10.3): with ``null=True`` the same probe is also trained on
spatially shuffled training labels (it can learn class priors, nothing spatial); with
``random_caches=(train, val)``, caches of the same data extracted from a randomly initialised
backbone (``featlab extract --weights none``), it is also fitted on those features (what the
architecture and the input give without training).
:func:`write_result` writes the table as ``.json`` and ``.csv``.

Examples:
    >>> result = probe_points("train.h5", "val.h5", points="stages")  # doctest: +SKIP
    >>> [(r["point"], round(r["miou"], 3)) for r in result.rows()]  # doctest: +SKIP
    [('layer1', 0.412), ('layer2', 0.538), ('layer3', 0.611), ('layer4', 0.597)]
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from featlab.analysis._io import write_json_csv
from featlab.analysis.pixel_probe import PixelProbe
from featlab._records import check_record
from featlab.distributed import resolve_device
from featlab.errors import CacheError, FeatlabWarning

__all__ = ["PixelProbe", "PointScore", "ProbeResult", "probe_points", "write_result",
           "read_result"]

log = logging.getLogger("featlab")

_SETTINGS = ("alpha", "alphas", "holdout", "standardize", "class_weight", "max_pixels",
             "max_iter", "tol", "dtype")


def _clean(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@dataclass(frozen=True)
class PointScore:
    """Probe scores of one skip point on the val cache (None where a value is undefined)."""

    point: str
    stride: int | None
    channels: int  # the features the probe saw: the stored channels (max_channels)
    pixel_accuracy: float | None
    mean_accuracy: float | None
    miou: float | None
    iou: tuple[float | None, ...]
    alpha: float
    n_pixels: int
    n_iter: int
    seconds: float
    null_pixel_accuracy: float | None = None
    null_miou: float | None = None
    random_pixel_accuracy: float | None = None
    random_miou: float | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["iou"] = list(self.iou)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PointScore:
        return _from_dict(cls, {**d, "iou": tuple(d.get("iou", ()))})


@dataclass(frozen=True)
class ProbeResult:
    """Per-point probe scores with everything that produced them.

    Attributes:
        scores: one :class:`PointScore` per probed point, in execution order.
        classes: class names (the ``iou`` entries follow this order).
        settings: the probe hyper-parameters, ``null``, ``random`` and ``points``.
        seed: seed of pixel sampling, held-out split and label shuffles.
        versions: featlab, torch, numpy, ... (``featlab.runinfo.run_versions``).
        train, val: cache identities (``CacheReader.identity()``).
        random_train, random_val: identities of the random-backbone caches, empty without them.
    """

    scores: tuple[PointScore, ...]
    classes: tuple[str, ...]
    settings: dict = field(default_factory=dict)
    seed: int = 0
    versions: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    val: dict = field(default_factory=dict)
    random_train: dict = field(default_factory=dict)
    random_val: dict = field(default_factory=dict)


    def __repr__(self) -> str:  # one line: the table is rows()
        scored = [s for s in self.scores if s.miou is not None]
        best = max(scored, key=lambda s: s.miou) if scored else None
        top = f": best val mIoU {best.miou:.4f} at {best.point}" if best else ""
        return f"ProbeResult({len(self.scores)} points, {len(self.classes)} classes{top})"

    def rows(self) -> list[dict]:
        """One flat dict per point (``point`` first; per-class IoU as ``iou_<class>``)."""
        out = []
        for s in self.scores:
            row = {k: v for k, v in s.to_dict().items() if k != "iou"}
            for baseline in ("null", "random"):
                if self.settings.get(baseline) is not True:
                    row.pop(f"{baseline}_pixel_accuracy")
                    row.pop(f"{baseline}_miou")
            row.update({f"iou_{name}": v for name, v in zip(self.classes, s.iou)})
            out.append(row)
        return out

    def to_dict(self) -> dict:
        return {"scores": [s.to_dict() for s in self.scores], "classes": list(self.classes),
                "settings": dict(self.settings), "seed": self.seed,
                "versions": dict(self.versions), "train": dict(self.train),
                "val": dict(self.val), "random_train": dict(self.random_train),
                "random_val": dict(self.random_val)}

    @classmethod
    def from_dict(cls, d: dict) -> ProbeResult:
        d = dict(d)
        d["scores"] = tuple(PointScore.from_dict(s) for s in d.get("scores", ()))
        d["classes"] = tuple(d.get("classes", ()))
        return _from_dict(cls, d)


def _from_dict(cls, d: dict):
    check_record(cls, d)
    return cls(**d)


def probe_points(train_cache: Any, val_cache: Any, points: Any = "all", *,
                 alpha: float | None = None, alphas: tuple[float, ...] = (1e-4, 1e-3, 1e-2),
                 holdout: float = 0.2, standardize: bool = True, class_weight: str | None = None,
                 max_pixels: int | None = 100_000, max_iter: int = 100, tol: float = 1e-4,
                 batch_size: int = 16, null: bool = False,
                 random_caches: tuple[Any, Any] | None = None, seed: int = 0,
                 device: str | None = None, dtype: str = "float32",
                 progress: bool = True) -> ProbeResult:
    """Fit a :class:`PixelProbe` per selected point on ``train_cache``; score on ``val_cache``.

    Args:
        train_cache, val_cache: cache paths or readers (``featlab.open_cache``) of the same
            model and points, with labels (train split for fitting, val split for scoring).
        points: a selection of stored points (``"all"``, ``"stages"``, globs, names).
        alpha ... tol, dtype: :class:`PixelProbe` hyper-parameters (``max_pixels`` training
            pixels per point; evaluation uses every non-ignored val pixel).
        batch_size: images read at a time (memory does not grow with the cache).
        null: also fit each point on spatially shuffled training labels (R-10.3) and report
            ``null_pixel_accuracy`` / ``null_miou``.
        random_caches: ``(train, val)`` caches of the same samples and points from the same
            architecture with random weights (R-10.3); each point is also probed on them and
            reported as ``random_pixel_accuracy`` / ``random_miou``.
        seed: seeds pixel sampling, the held-out split and shuffles.
        device: solver device; None: CUDA when available.
        progress: a progress bar over points (also off with ``FEATLAB_PROGRESS=0``).

    Returns:
        A :class:`ProbeResult`; ``rows()`` has ``point, stride, channels, pixel_accuracy,
        mean_accuracy, miou, ...`` per point.

    Raises:
        CacheError: the caches do not share model, points or classes; the random caches hold
            other samples, another architecture or the trained weights themselves.
        ConfigError: bad hyper-parameters.
    """
    from tqdm.auto import tqdm

    from featlab.cache.reader import CacheReader, open_cache
    from featlab.runinfo import progress_enabled, run_versions

    def opened(cache):
        return cache if isinstance(cache, CacheReader) else open_cache(cache)

    train, val = opened(train_cache), opened(val_cache)
    _check_pair(train, val)
    names = train.select(points)
    random = None if random_caches is None else tuple(opened(c) for c in random_caches)
    if random is not None:
        _check_random(train, val, *random)
    for other, what in ((val, "val"), *(zip(random or (), ("random train", "random val")))):
        missing = [n for n in names if n not in other]
        if missing:
            raise CacheError(f"the {what} cache must store every probed point; "
                             f"{str(other.path)!r} lacks {missing}. Fix: choose --points stored "
                             "in all caches, or re-extract.")
        for n in names:  # a probe fit on some features must be scored on the same ones
            if (other.stored_size(n) != train.stored_size(n)
                    or not np.array_equal(other.stored_channels(n), train.stored_channels(n))):
                raise CacheError(f"the {what} cache must store point {n!r} as the train cache "
                                 f"does (the same pooled size and channels); "
                                 f"{str(other.path)!r} does not. Fix: extract both with the "
                                 "same --max-size, --max-channels and --channel-seed.")
    classes = tuple(train.classes)
    params = dict(alpha=alpha, alphas=tuple(alphas), holdout=holdout, standardize=standardize,
                  class_weight=class_weight, max_pixels=max_pixels, num_classes=len(classes),
                  max_iter=max_iter, tol=tol, batch_size=batch_size, device=device, dtype=dtype,
                  seed=seed)
    PixelProbe(**params)._check_params()
    dev = resolve_device(device)  # a device this machine lacks fails before the first fit
    _warn_caveats(train, val, random)  # after every check: a refused call only errs
    show = progress_enabled(progress)
    scores = []
    for name in tqdm(names, desc="probe", unit="point", disable=not show):
        rec = train.point(name)
        probe = PixelProbe(**params).fit(train[name], train.labels)
        cm = probe.evaluate(val[name], val.labels)
        extra = {}
        if null:
            shuffled = PixelProbe(**params, shuffle_labels=True).fit(train[name], train.labels)
            ncm = shuffled.evaluate(val[name], val.labels)
            extra = {"null_pixel_accuracy": _clean(ncm.pixel_accuracy()),
                     "null_miou": _clean(ncm.miou())}
        if random is not None:
            rtrain, rval = random
            rcm = PixelProbe(**params).fit(rtrain[name], rtrain.labels).evaluate(rval[name],
                                                                                 rval.labels)
            extra.update(random_pixel_accuracy=_clean(rcm.pixel_accuracy()),
                         random_miou=_clean(rcm.miou()))
        scores.append(PointScore(
            name, rec.stride, len(val.stored_channels(name)), _clean(cm.pixel_accuracy()),
            _clean(cm.mean_accuracy()), _clean(cm.miou()),
            tuple(_clean(v) for v in cm.iou()), probe.alpha_, probe.n_pixels_, probe.n_iter_,
            round(probe.fit_seconds_, 4), **extra))
        log.info("probe %s: mIoU %.4f, pixel accuracy %.4f (alpha %.3g, %d pixels, %.1f s)",
                 name, cm.miou(), cm.pixel_accuracy(), probe.alpha_, probe.n_pixels_,
                 probe.fit_seconds_)
    settings = {k: (list(v) if isinstance(v, tuple) else v)
                for k, v in params.items() if k in _SETTINGS}
    settings.update(null=null, random=random is not None,
                    points=points if isinstance(points, str) else list(points))
    random_ids = ({}, {}) if random is None else tuple(c.identity() for c in random)
    return ProbeResult(tuple(scores), classes, settings, seed, run_versions(dev),
                       train.identity(), val.identity(), *random_ids)


def _check_pair(train, val) -> None:
    from featlab.cache.joins import backbone_difference

    model = backbone_difference(train, val)  # the field, not both records
    classes = ("classes", train.classes, val.classes) if train.classes != val.classes else None
    for differs, what in ((model, "model's "), (classes, "")):
        if differs is not None:
            key, a, b = differs
            raise CacheError(f"train and val caches must share the {what}{key}; got {a!r} in "
                             f"{str(train.path)!r} and {b!r} in {str(val.path)!r}. Fix: extract "
                             "both splits with the same model and data set.")
    if not train.classes:
        raise CacheError(f"the train cache must record its classes; {str(train.path)!r} has "
                         "none. Fix: re-extract it with featlab extract.")


def _check_random(train, val, rtrain, rval) -> None:
    """The random-backbone caches: same samples and architecture, other (random) weights."""
    from featlab.cache.joins import backbone_difference

    arch = (train.model or {}).get("name")
    for cache, real in ((rtrain, train), (rval, val)):
        where = str(cache.path)
        if (cache.model or {}).get("name") != arch:
            raise CacheError(f"a random-backbone cache must come from the probed architecture "
                             f"{arch!r}; {where!r} holds {(cache.model or {}).get('name')!r}. "
                             f"Fix: extract it with --model {arch} --weights none.")
        if backbone_difference(cache, real) is None:
            raise CacheError(f"a random-backbone cache must come from other weights than the "
                             f"probed caches; {where!r} has the same backbone. Fix: extract it "
                             f"with --weights none.")
        if cache.ids_sha256 != real.ids_sha256:
            raise CacheError(f"a random-backbone cache must hold the same samples as "
                             f"{str(real.path)!r}; {where!r} holds others. Fix: extract it from "
                             "the same data, split, size and --limit.")
    differs = backbone_difference(rtrain, rval)
    if differs is not None:
        key, a, b = differs
        raise CacheError(f"the random train and val caches must share one model; their {key} "
                         f"differs: {a!r} and {b!r}. Fix: extract both with the same "
                         "--weights none --seed S.")


def _warn_caveats(train, val, random) -> None:
    """Scores a call computes but that do not mean what the result's names say."""
    if train.ids_sha256 is not None and train.ids_sha256 == val.ids_sha256:
        warnings.warn(f"the probe's scores must be held out; the train and val caches hold "
                      f"the same samples ({train.path}). Fix: extract the val split into its "
                      "own cache.", FeatlabWarning, stacklevel=3)
    weights = None if random is None else (random[0].model or {}).get("weights")
    if random is not None and weights != "none":
        warnings.warn(f"the random-backbone baseline should come from a random "
                      f"initialisation; its caches hold weights {weights!r}. Fix: extract them "
                      "with --weights none.", FeatlabWarning, stacklevel=3)


def write_result(result: ProbeResult, path: str | os.PathLike, *, force: bool = False
                 ) -> tuple[Path, Path]:
    """Write ``<path>.json`` (the whole result) and ``<path>.csv`` (``rows()``).

    A ``.json`` or ``.csv`` suffix of ``path`` is replaced. Existing files are an error unless
    ``force``.
    """
    base = Path(path)
    if base.suffix in (".json", ".csv"):
        base = base.with_suffix("")
    out_json, out_csv = write_json_csv(result.to_dict(), result.rows(), base, force=force)
    log.info("wrote %s and %s", out_json, out_csv)
    return out_json, out_csv


def read_result(path: str | os.PathLike) -> ProbeResult:
    """Read a result written by :func:`write_result` (the ``.json`` file)."""
    return ProbeResult.from_dict(json.loads(Path(path).read_text()))
