"""The skip sweep — ``featlab sweep``: which single skip connection helps, and by how much.

For every chosen skip point and every seed, a single-skip head is trained with the same schedule
as the baseline (last point only) of the same seed; the table reports each point's mIoU over
seeds (mean ± std and per-seed values), the gain over the baseline, 95% confidence intervals
for the gain — paired over seeds (Student t on the per-seed differences), a seeded bootstrap
over val images (per-image confusion matrices resampled, data-set mIoU recomputed), both sources
together (:func:`gain_interval`), and that widened to hold for all points at once — whether the
gain exceeds twice the seed-to-seed std (descriptive), a rank, and how often each point ranks
first when images and seeds are resampled (:func:`best_share`). Runs live in
``<out>/runs/<run name>/``; a killed sweep re-run with the same command skips finished runs and
resumes the unfinished one from its checkpoint. :func:`~featlab.report.tables.property_table`
and :func:`~featlab.report.tables.predictors` join the gains with cheap per-point properties.

Examples:
    >>> r = sweep("train.h5", "val.h5", points="stages", seeds=3)  # doctest: +SKIP
    >>> [row["point"] for row in r.rows()][:2]  # doctest: +SKIP
    ['baseline', 'relu']
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featlab import distributed as fdist
from featlab._records import check_record, with_overrides
from featlab.cache.plan import format_bytes
from featlab.errors import ConfigError
from featlab.segment import runs
from featlab.segment.metrics import _class_totals, _iou_of
from featlab.segment.sources import Preloads, check_caches
from featlab.segment.train import FLAG_FIELDS, HeadSettings, run_name, train_head

log = logging.getLogger("featlab")

__all__ = ["SweepResult", "sweep", "sweep_difference", "read_sweep", "write_sweep", "gain_stats",
           "gain_interval", "best_share"]

BASELINE = "baseline"
SWEEP_FILES = ("sweep.json", "sweep.csv", "predictors.json")  # what a sweep writes at its end


@dataclass(frozen=True)
class SweepResult:
    """Per-seed val mIoU of the baseline and of each single-skip head, and the gain statistics.

    Attributes:
        last: the last point (the baseline's features).
        points: the skip points, in execution order.
        seeds: the seeds every configuration was trained with.
        baseline: baseline mIoU per seed.
        skips: ``{point: [mIoU per seed]}``.
        gain_ci_images: ``{point: [lo, hi]}`` bootstrap interval over val images.
        settings: the :class:`HeadSettings` every run shares, as a dict (without ``seed`` and
            ``skip``: see ``seeds`` and ``points``).
        stride, rf_size: per point, from the cache's skip-point records.
        bootstrap, confidence, bootstrap_seed: the bootstrap's settings.
        train, val: identities of the caches; versions: what produced it; seconds: wall time.
        p_best: ``{point: share}`` of the resamples of val images and seeds in which the point
            has the largest gain (:func:`best_share`): how sure rank 1 is.
    """

    last: str
    points: tuple
    seeds: tuple
    baseline: tuple
    skips: dict
    gain_ci_images: dict
    settings: dict
    stride: dict
    rf_size: dict
    bootstrap: int
    confidence: float
    bootstrap_seed: int
    train: dict
    val: dict
    versions: dict
    seconds: float
    folder: str
    p_best: dict = dataclasses.field(default_factory=dict)  # {} in records made before it


    def __repr__(self) -> str:  # one line: the whole record is to_dict(), the table rows()
        gains = self.gains()
        best = max(gains, key=gains.get) if gains else None
        top = f"; best {best} {gains[best]:+.4f}" if best else ""
        p, k = len(self.points), len(self.seeds)
        return (f"SweepResult({p} point{'s' * (p != 1)} x {k} seed{'s' * (k != 1)}: baseline "
                f"mIoU {np.mean(self.baseline):.4f}{top}; folder={self.folder!r})")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SweepResult:
        check_record(cls, d)
        return cls(**{**d, **{k: tuple(d[k]) for k in ("points", "seeds", "baseline")}})

    def gains(self) -> dict[str, float]:
        """Mean gain over the baseline per point (paired by seed)."""
        return {p: float(np.mean(np.subtract(v, self.baseline))) for p, v in self.skips.items()}

    def rows(self) -> list[dict]:
        """The table: the baseline first, then one row per point in execution order."""
        base = np.asarray(self.baseline, dtype=np.float64)
        out = [{"point": BASELINE, "stride": None, "rf_size": None, **_spread(base),
                "per_seed": [float(v) for v in base], "gain": 0.0, "gain_std": None,
                "gain_ci_seeds": None, "gain_ci_images": None, "gain_ci": None,
                "gain_ci_all_points": None, "beats_2std": None, "rank": None, "p_best": None}]
        gains = self.gains()
        order = sorted(self.points, key=lambda p: -gains[p])
        for p in self.points:
            vals = np.asarray(self.skips[p], dtype=np.float64)
            g = gain_stats(vals, base, self.confidence)
            images = self.gain_ci_images.get(p)
            both = [gain_interval(vals - base, images, self.confidence, tests)
                    for tests in (1, len(self.points))]
            noise = max(np.std(vals, ddof=1) if len(vals) > 1 else 0.0,
                        np.std(base, ddof=1) if len(base) > 1 else 0.0)
            out.append({"point": p, "stride": self.stride.get(p), "rf_size": self.rf_size.get(p),
                        **_spread(vals), "per_seed": [float(v) for v in vals],
                        "gain": float(g["gain"]), "gain_std": _r(g["std"]),
                        "gain_ci_seeds": ([_r(g["lo"]), _r(g["hi"])] if len(vals) > 1
                                          else None),  # undefined with one seed
                        "gain_ci_images": [_r(v) for v in images or (None, None)],
                        "gain_ci": None if both[0] is None else [_r(v) for v in both[0]],
                        "gain_ci_all_points": (None if both[1] is None
                                               else [_r(v) for v in both[1]]),
                        "beats_2std": bool(g["gain"] > 2 * noise) if len(vals) > 1 else None,
                        "rank": order.index(p) + 1, "p_best": self.p_best.get(p)})
        return out


def _r(x):
    """A float for the table (full precision: only the printed table rounds), None for NaN."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _spread(v: np.ndarray) -> dict:
    return {"miou_mean": float(v.mean()),
            "miou_std": float(v.std(ddof=1)) if len(v) > 1 else None}


def gain_stats(skip: Sequence[float], base: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean paired gain, its std over seeds and a Student-t interval (NaN with one seed).

    Examples:
        >>> g = gain_stats([0.52, 0.55, 0.53], [0.50, 0.52, 0.51])
        >>> round(g["gain"], 3), g["lo"] < g["gain"] < g["hi"]
        (0.023, True)
    """
    from scipy import stats

    d = np.subtract(skip, base).astype(np.float64)
    mean = float(d.mean())
    if len(d) < 2:
        return {"gain": mean, "std": math.nan, "lo": math.nan, "hi": math.nan}
    sd = float(d.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, len(d) - 1)) * sd / math.sqrt(len(d))
    return {"gain": mean, "std": sd, "lo": mean - half, "hi": mean + half}


def gain_interval(per_seed_gain: Sequence[float], images_ci: Sequence[float] | None,
                  confidence: float = 0.95, tests: int = 1) -> tuple[float, float] | None:
    """Interval for the mean gain that counts both sources of noise (None with one seed).

    The seed interval holds the val images fixed and the image bootstrap holds the trained
    heads fixed; each alone is too narrow when the other varies (with a realistic seed-to-seed
    spread the image interval alone excludes 0 for most null points). Their half-widths add in
    quadrature: ``t * s / sqrt(k)`` of the per-seed gains (``k - 1`` degrees of freedom) and
    half the bootstrap interval's width, so the interval is never narrower than either.
    ``tests`` > 1 widens it for that many points read together (Bonferroni: the t and the normal
    quantiles at ``1 - (1 - confidence) / (2 tests)``; the image half-width is scaled by the
    ratio of normal quantiles), so that every interval of a sweep holds at once.

    Examples:
        >>> lo, hi = gain_interval([0.012, 0.015, 0.013], [0.008, 0.019])
        >>> round(lo, 4), round(hi, 4)
        (0.0067, 0.02)
    """
    from scipy import stats

    d = np.asarray(per_seed_gain, dtype=np.float64)
    k = len(d)
    if k < 2 or images_ci is None or any(v is None for v in images_ci):
        return None
    level = 1 - (1 - confidence) / (2 * tests)
    seeds = float(stats.t.ppf(level, k - 1)) * float(d.std(ddof=1)) / math.sqrt(k)
    images = (images_ci[1] - images_ci[0]) / 2 * float(
        stats.norm.ppf(level) / stats.norm.ppf(0.5 + confidence / 2))
    half, mean = math.hypot(seeds, images), float(d.mean())
    return mean - half, mean + half


def _image_weights(rng: np.random.Generator, num: int, n: int) -> np.ndarray:
    """``[n, num]``: how often each of ``num`` val images is drawn in each of ``n`` resamples."""
    return np.stack([np.bincount(rng.integers(0, num, num), minlength=num)
                     for _ in range(n)]).astype(np.float64)


def _image_totals(per_image: np.ndarray) -> np.ndarray:
    """``[images, 2, C]`` float64: each image's true positives and row + column sums per class
    (:func:`~featlab.segment.metrics._class_totals`) from its confusion matrix ``[C, C]``.

    A resample's confusion matrix is the weighted sum of the images', and its IoU needs only
    these totals, which are the same weighted sums of the images': ``2C`` numbers per image
    instead of ``C^2`` (ADE20K's 150 classes: 75x fewer). The counts are whole numbers, so the
    sums are exact and the mIoU is the summed matrices' own, bit for bit.
    """
    return np.stack(_class_totals(per_image), 1)


def _resampled_miou(weights: np.ndarray, per_seed: Sequence[np.ndarray]) -> np.ndarray:
    """``[n, seeds]`` data-set mIoU in each resample (``weights`` from :func:`_image_weights`)
    of each seed's per-image totals (:func:`_image_totals`): one matrix product."""
    totals = np.stack(per_seed, 1)  # [images, seeds, 2, C]
    images, seeds, _, c = totals.shape
    out = (weights @ totals.reshape(images, -1)).reshape(len(weights), seeds, 2, c)
    return np.nanmean(_iou_of(out[..., 0, :], out[..., 1, :]), axis=-1)


def bootstrap_gain(skip: Sequence[np.ndarray], base: Sequence[np.ndarray], *, n: int = 1000,
                   confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the seed-averaged mIoU gain, resampling val images.

    ``skip`` and ``base``: per-seed per-image confusion matrices ``[N, C, C]`` (same images in
    the same order). Each resample draws N images with replacement (one draw shared by every
    seed and both heads: a paired bootstrap).
    """
    return _bootstrap_gains({None: [_image_totals(m) for m in skip]},
                            [_image_totals(m) for m in base], n=n, confidence=confidence,
                            seed=seed)[None]


def _bootstrap_gains(skips: dict, base: Sequence[np.ndarray], *, n: int, confidence: float,
                     seed: int) -> dict:
    """:func:`bootstrap_gain` of each point of ``skips`` (``{point: per-seed per-image
    totals}``, :func:`_image_totals`): one draw of the images and one resampled baseline
    for all points, the same that a call per point with this seed would make."""
    weights = _image_weights(np.random.default_rng(seed), len(base[0]), n)
    gb = _resampled_miou(weights, base).mean(1)
    out = {}
    for p, totals in skips.items():
        gs = _resampled_miou(weights, totals).mean(1)
        lo, hi = np.percentile(gs - gb, [50 * (1 - confidence), 50 * (1 + confidence)])
        out[p] = (float(lo), float(hi))
    return out


def best_share(skips: dict[str, Sequence[np.ndarray]], base: Sequence[np.ndarray], *,
               n: int = 1000, seed: int = 0) -> dict[str, float]:
    """Share of ``n`` resamples in which each point has the largest mean gain (ties split).

    ``skips``: ``{point: per-seed per-image confusion matrices}``, ``base`` the baseline's, as
    for :func:`bootstrap_gain`. Each resample draws the val images with replacement and the
    seeds with replacement, one draw of each shared by every point and the baseline, so it
    counts both sources of noise as :func:`gain_interval` does. A rank 1 with a share near
    ``1 / len(skips)`` is a tie. The draws come from their own stream (``[seed, 1]``): the
    image intervals of the same seed are unchanged.

    Examples:
        >>> eye = np.tile(np.eye(2, dtype=np.int64), (4, 1, 1))  # 4 images, all right
        >>> half = np.tile(np.array([[1, 0], [1, 0]]), (4, 1, 1))  # all called class 0
        >>> best_share({"good": [eye, eye], "bad": [half, half]}, [half, half], n=50)
        {'good': 1.0, 'bad': 0.0}
    """
    return _best_share({p: [_image_totals(m) for m in ms] for p, ms in skips.items()},
                       [_image_totals(m) for m in base], n=n, seed=seed)


def _best_share(skips: dict[str, Sequence[np.ndarray]], base: Sequence[np.ndarray], *, n: int,
                seed: int) -> dict[str, float]:
    """:func:`best_share` of per-image totals (:func:`_image_totals`)."""
    rng = np.random.default_rng([seed, 1])
    names = list(skips)
    k = len(base)
    weights = _image_weights(rng, len(base[0]), n)
    picks = rng.integers(0, k, (n, k))  # the seeds of each resample
    base_miou = _resampled_miou(weights, base)
    gains = np.empty((n, len(names)))
    for j, p in enumerate(names):
        diff = _resampled_miou(weights, skips[p]) - base_miou
        gains[:, j] = np.take_along_axis(diff, picks, 1).mean(1)
    best = gains >= gains.max(1, keepdims=True)
    share = (best / best.sum(1, keepdims=True)).mean(0)
    return {p: round(float(share[j]), 4) for j, p in enumerate(names)}


def sweep(train, val, points: str | Sequence[str] = "stages", seeds: int | Sequence[int] = 3,
          settings: HeadSettings | None = None, *, out=None, device=None, progress: bool = True,
          force: bool = False, bootstrap: int = 1000, confidence: float = 0.95,
          bootstrap_seed: int = 0, preload: bool = True, **overrides) -> SweepResult:
    """Train the baseline and one single-skip head per point per seed; compare them.

    Args:
        train, val: caches (paths or readers) of one backbone on two splits.
        points: skip points (a selection over the cache's points; the last point is the
            baseline's and is left out).
        seeds: a count (seeds ``0 .. n-1``) or the seeds themselves.
        settings: shared :class:`HeadSettings` (``overrides`` replace fields, e.g. ``epochs``).
        out: sweep folder (default ``<train cache folder>/sweep``); runs go to ``out/runs``.
        force: train every run again (else finished runs are reused, unfinished ones resumed).
        bootstrap, confidence, bootstrap_seed: the bootstrap over val images.
        preload: hold the points in memory, read once for all runs while they fit in the
            budget of a :class:`~featlab.segment.sources.Preloads` (else per batch from the
            file; a preload that would not fit does that anyway, with a warning).

    Returns:
        The :class:`SweepResult` (write it with :func:`write_sweep`).
    """
    from featlab.runinfo import run_versions

    started = time.perf_counter()
    train, val, settings, seeds, names = _resolve(train, val, points, seeds, settings, overrides)
    last = train.point_names[-1]
    check_caches(train, val, [*names, last])  # before any run: a refusal leaves nothing behind
    folder = Path(out) if out is not None else train.path.parent / "sweep"
    if not force:  # a sweep.csv or predictors.json of the user's is not overwritten
        fdist.from_main(lambda: runs.refuse_foreign(folder, SWEEP_FILES, ("sweep.json",),
                                                    "sweep"))
    configs = [None, *names]
    total, done = len(configs) * len(seeds), 0
    store = Preloads() if preload else False  # the runs share what they read
    results: dict = {}
    for seed in seeds:  # seed-major: a partial sweep already holds complete comparisons
        for skip in configs:
            s = dataclasses.replace(settings, skip=skip, seed=seed)
            done += 1
            log.info("sweep run %d/%d: %s", done, total, run_name(s))
            results[(skip, seed)] = train_head(train, val, s, out=folder / "runs" / run_name(s),
                                               device=device, progress=progress, force=force,
                                               reuse=True, preload=store)
    if store:
        log.info("sweep: read %s of cached arrays for %d runs", format_bytes(store.bytes_read),
                 total)
    # each run's per-image matrices [N, C, C] taken down to their totals [N, 2, C] as they are
    # read: one run's matrices in memory at a time (ADE20K val: 360 MB each), not the sweep's
    per_image = fdist.from_main(lambda: {
        k: _image_totals(runs.read_confusions(Path(r.folder)))
        for k, r in results.items()})  # rank 0 wrote them
    skips = {p: [per_image[(p, s)] for s in seeds] for p in names}
    base = [per_image[(None, s)] for s in seeds]
    ci = {p: list(v) for p, v in _bootstrap_gains(skips, base, n=bootstrap, confidence=confidence,
                                                  seed=bootstrap_seed).items()}
    best = _best_share(skips, base, n=bootstrap, seed=bootstrap_seed)
    records = {p.name: p for p in train.points}
    return SweepResult(
        last=last, points=tuple(names), seeds=seeds,
        baseline=tuple(results[(None, s)].miou for s in seeds),
        skips={p: [results[(p, s)].miou for s in seeds] for p in names},
        gain_ci_images=ci, settings=_shared(settings.to_dict()),
        stride={p: records[p].stride for p in names},
        rf_size={p: records[p].rf_size for p in names}, bootstrap=bootstrap,
        confidence=confidence, bootstrap_seed=bootstrap_seed, train=train.identity(),
        val=val.identity(), versions=run_versions(fdist.resolve_device(device)),  # its runs
        seconds=round(time.perf_counter() - started, 1), folder=os.path.abspath(folder),
        p_best=best)


def _shared(settings: dict) -> dict:
    """The head settings every run of a sweep shares: all but ``seed`` and ``skip``, which the
    sweep sets per run (its ``seeds`` and ``points`` record them)."""
    return {k: v for k, v in settings.items() if k not in ("seed", "skip")}


def _resolve(train, val, points, seeds, settings, overrides: dict):
    """The sweep's arguments as it runs them: open caches, the shared settings, the seeds and
    the skip points (the last point, the baseline's, left out); bad ones raise ConfigError."""
    from featlab.cache.reader import open_cache

    train = train if hasattr(train, "select") else open_cache(train, allow_partial=False)
    val = val if hasattr(val, "select") else open_cache(val, allow_partial=False)
    settings = with_overrides(settings or HeadSettings(), overrides, "sweep")
    if settings.skip is not None:
        raise ConfigError(f"sweep settings must leave `skip` unset (the sweep sets it); got "
                          f"skip={settings.skip!r}. Fix: choose points with `points`.")
    seeds = tuple(range(seeds)) if isinstance(seeds, int) else tuple(int(s) for s in seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be a positive count or distinct seeds; got {seeds!r}. "
                          "Fix: e.g. --seeds 3, or --seed-list 0 1 2.")
    last = train.point_names[-1]
    names = [p for p in train.select(points) if p != last]
    if not names:
        raise ConfigError(f"points must select at least one point before the last one "
                          f"({last!r}); got {points!r}. Fix: --points stages or all.")
    return train, val, settings, seeds, names


def sweep_difference(record: SweepResult, train, val, points: str | Sequence[str] = "stages",
                     seeds: int | Sequence[int] = 3, settings: HeadSettings | None = None, *,
                     bootstrap: int = 1000, confidence: float = 0.95, bootstrap_seed: int = 0,
                     extends: bool = False, **overrides) -> tuple[str, str, str] | None:
    """The first way in which :func:`sweep` with these arguments would differ from the finished
    sweep ``record`` (its ``sweep.json``): ``(what, there, now)``, or None when it would be the
    same sweep -- the same shared head settings, seeds, points, bootstrap and caches (compared
    by identity without the path: the same files moved are the same caches). ``extends``: more
    seeds or points than the record's (all of its own among them) are no difference: such a
    sweep reuses every finished run and adds the new ones.

    Examples:
        >>> record = SweepResult.from_dict(json.load(open("sweep/sweep.json")))  # doctest: +SKIP
        >>> sweep_difference(record, "train.h5", "val.h5", "stages", 3, epochs=2)  # doctest: +SKIP
        ('`--epochs`', '8', '2')
    """
    from featlab.cache.joins import identity_difference

    train, val, settings, seeds, names = _resolve(train, val, points, seeds, settings, overrides)
    now = _shared(settings.to_dict())  # as the sweep records it
    then = _shared({**HeadSettings().to_dict(), **record.settings})  # fields added: defaults
    for key in sorted(set(then) | set(now)):
        if then.get(key) != now.get(key):
            what = (f"`--{key.replace('_', '-')}`" if key in FLAG_FIELDS
                    else f"the head setting `{key}`")
            return what, repr(then.get(key)), repr(now.get(key))
    for what, there, here in (("the seed list (`--seeds`, `--seed-list`)", list(record.seeds),
                               list(seeds)),
                              ("the skip point list (`--points`)", list(record.points), names)):
        if there != here and not (extends and set(there) <= set(here)):
            return what, repr(there), repr(here)
    for what, there, here in (("the number of bootstrap resamples (`--bootstrap`)",
                               record.bootstrap, bootstrap),
                              ("the bootstrap's confidence", record.confidence, confidence),
                              ("the bootstrap's seed", record.bootstrap_seed, bootstrap_seed)):
        if there != here:
            return what, repr(there), repr(here)
    for split, then, cache in (("train", record.train, train), ("val", record.val, val)):
        now = cache.identity()
        key = identity_difference(then, now)
        if key is not None:
            return f"the {split} cache (its `{key}`)", repr(then.get(key)), repr(now.get(key))
    return None


def read_sweep(folder) -> SweepResult:
    """The :class:`SweepResult` a finished sweep wrote in ``folder`` (``sweep.json``)."""
    path = Path(folder) / "sweep.json"
    try:
        return SweepResult.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{path} must be a sweep record featlab wrote; it cannot be read "
                          f"({type(err).__name__}: {err}). Fix: pass --force to run the sweep "
                          "again, or choose another --out.") from err


def write_sweep(result: SweepResult, folder=None) -> list[Path]:
    """Write ``sweep.json`` (the result) and ``sweep.csv`` (the table) into ``folder``."""
    folder = Path(folder or result.folder)
    folder.mkdir(parents=True, exist_ok=True)
    runs.write_json(folder / "sweep.json", result.to_dict())
    rows = result.rows()
    with open(folder / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
                    for r in rows)
    return [folder / "sweep.json", folder / "sweep.csv"]
