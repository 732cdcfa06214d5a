"""What predicts a skip point's usefulness: join cheap per-point properties with sweep gains.

:func:`property_table` gathers, per skip point, the properties featlab measures elsewhere:
``stride``, ``rf_size`` and ``channels`` (from the cache's skip-point records),
``resolution_ceiling`` (the best mIoU reachable at the point's stride,
:mod:`featlab.analysis.resolution`), ``cka_to_last`` (debiased linear CKA with the last point,
:mod:`featlab.analysis.similarity`) and ``probe_miou`` (a per-pixel linear probe,
:mod:`featlab.analysis.probe`), and ``depth``, the point's place in the forward: on one
backbone most properties rise or fall with depth, and a property explains the gain better than
depth alone only where its correlation is clearly stronger. A property whose module is missing
or fails is left out with a logged note, so a sweep never loses its result to an analysis.
:func:`predictors` reports the Spearman correlation of each property with the gain across
points, with an exact permutation p-value for up to :data:`EXACT_MAX_POINTS` points (a sweep
usually has 4) and a seeded Monte Carlo one beyond.

Examples:
    >>> class R:  # a stand-in for a SweepResult
    ...     def gains(self): return {"a": 0.01, "b": 0.03, "c": 0.02}
    >>> rows = predictors(R(), {"stride": {"a": 2, "b": 8, "c": 4}})
    >>> rows[0]["property"], rows[0]["spearman_rho"], rows[0]["n_points"]
    ('stride', 1.0, 3)
    >>> rows[0]["p_value"], rows[0]["p_method"]  # 2 of the 3! orderings reach |rho| = 1
    (0.3333, 'exact')
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np

from featlab.errors import ConfigError

log = logging.getLogger("featlab")

__all__ = ["property_table", "predictors", "spearman_exact_p", "spearman_permutation_p",
           "holm", "PROPERTIES", "EXACT_MAX_POINTS", "PERMUTATIONS"]

PROPERTIES = ("depth", "stride", "rf_size", "channels", "resolution_ceiling", "cka_to_last",
              "probe_miou")

#: Up to this many points :func:`predictors` enumerates all n! orderings for the p-value
#: (9! = 362,880 takes ~0.2 s); above it, :data:`PERMUTATIONS` seeded random orderings.
EXACT_MAX_POINTS = 9
#: Random orderings of the Monte Carlo permutation p-value above :data:`EXACT_MAX_POINTS` points.
PERMUTATIONS = 100_000


def property_table(train_cache, val_cache, points: str | Sequence[str] | None = None, *,
                   include: Sequence[str] = PROPERTIES, seed: int = 0,
                   notes: list | None = None, provenance: dict | None = None
                   ) -> dict[str, dict[str, float]]:
    """``{property: {point: value}}`` for the points (default: all but the last).

    Args:
        train_cache, val_cache: the sweep's caches (paths or readers).
        points: a selection over the cache's points.
        include: which properties to compute (see :data:`PROPERTIES`).
        seed: passed to the analyses that draw random numbers.
        notes: if given, one string per skipped property is appended (also logged).
        provenance: if given, filled with what produced the values: ``seed``, ``points``, the
            caches' identities (``train``, ``val``), and per computed property how it was
            measured (``measured``: the CKA estimator, the probe's settings and the
            regularisation strength it chose per point, ...).
    """
    from featlab.cache.reader import open_cache

    train = train_cache if hasattr(train_cache, "select") else open_cache(train_cache)
    val = val_cache if hasattr(val_cache, "select") else open_cache(val_cache)
    last = val.point_names[-1]
    names = [p for p in val.select(points) if p != last]
    records = {p.name: p for p in val.points}
    table: dict[str, dict[str, float]] = {}
    measured: dict[str, dict] = {}
    if "depth" in include:  # the forward's order: the cache stores its points in it
        table["depth"] = {p: float(val.point_names.index(p)) for p in names}
        measured["depth"] = {"from": "the point's place among the val cache's points, in "
                                     "execution order"}
    for key in ("stride", "rf_size", "channels"):
        if key in include:
            table[key] = {p: float(getattr(records[p], key)) for p in names
                          if getattr(records[p], key) is not None}
            measured[key] = {"from": "the val cache's skip-point records"}
    jobs = {"resolution_ceiling": lambda: _ceiling(val, names),
            "cka_to_last": lambda: _cka(val, names, last),
            "probe_miou": lambda: _probe(train, val, names, seed)}
    for key, job in jobs.items():
        if key not in include:
            continue
        try:
            table[key], measured[key] = job()
        except ImportError as err:
            _note(notes, f"{key} skipped: its module is not available ({err})")
        except Exception as err:  # an analysis failing must not cost the sweep its result
            _note(notes, f"{key} skipped: {type(err).__name__}: {err}")
    if provenance is not None:
        provenance.update({"seed": seed, "points": names, "train": train.identity(),
                           "val": val.identity(), "measured": measured})
    return table


def _note(notes: list | None, text: str) -> None:
    log.warning("property_table: %s", text)
    if notes is not None:
        notes.append(text)


def _ceiling(val, names: list[str]) -> tuple[dict[str, float], dict]:
    from featlab.analysis.resolution import resolution_table

    rows = {r["point"]: r for r in resolution_table(val, progress=False).rows()}
    return ({p: float(rows[p]["ceiling_miou"]) for p in names
             if rows.get(p, {}).get("ceiling_miou") is not None},
            {"from": "resolution_table of the val cache: ceiling_miou, the better of the "
                     "nearest and majority reductions"})


def _cka(val, names: list[str], last: str) -> tuple[dict[str, float], dict]:
    from featlab.analysis.similarity import cka_matrix

    # debiased: the biased estimator grows with a point's width at a fixed number of images,
    # and width grows with depth, which would pass for a correlation with the gain
    r = cka_matrix(val, kind="linear", estimator="debiased", progress=False)
    rows, cols = list(r.names), list(getattr(r, "columns", None) or r.names)
    j = cols.index(last)
    return ({p: float(np.asarray(r.matrix)[rows.index(p), j]) for p in names if p in rows},
            {"from": "cka_matrix of the val cache", "to": last, "kind": r.kind,
             "estimator": r.estimator, "spatial": r.spatial, "num_images": r.num_images})


def _probe(train, val, names: list[str], seed: int) -> tuple[dict[str, float], dict]:
    from featlab.analysis.probe import probe_points

    result = probe_points(train, val, points=names, seed=seed, progress=False)
    rows = {r["point"]: r for r in result.rows()}
    return ({p: float(rows[p]["miou"]) for p in names if p in rows},
            {"from": "probe_points, trained on the train cache, scored on the val cache",
             "settings": dict(result.settings), "alpha": {s.point: s.alpha for s in result.scores},
             "n_pixels": {s.point: s.n_pixels for s in result.scores}})


def predictors(sweep_result, properties: dict[str, dict[str, float]]) -> list[dict]:
    """Spearman correlation of each property with the mean gain, across points.

    ``spearman_rho`` is Pearson's correlation of the average ranks (ties share their mean
    rank), as :func:`scipy.stats.spearmanr`. The two-sided ``p_value`` is, for up to
    :data:`EXACT_MAX_POINTS` points, exact (:func:`spearman_exact_p`: the fraction of all n!
    pairings of the ranks whose |rho| is at least the observed one, ties included; with 4
    points and rho = 1 that is 2/24 = 0.0833, where the t-approximation says 0.0); for more
    points a seeded Monte Carlo permutation test (:func:`spearman_permutation_p`,
    :data:`PERMUTATIONS` random orderings).

    Args:
        sweep_result: a :class:`~featlab.segment.sweep.SweepResult` (anything with ``gains()``).
        properties: ``{property: {point: value}}`` (:func:`property_table`).

    Returns:
        One dict per property: ``property``, ``spearman_rho``, ``p_value`` (None when fewer
        than 3 points or a constant property; 4 significant digits), ``p_method`` (how
        ``p_value`` was obtained: ``"exact"`` or ``"permutation"``; None with ``p_value``),
        ``p_holm`` (``p_value`` adjusted for testing every property of the call together,
        :func:`holm`; None with ``p_value``), ``n_points``, ``values`` (the joined points), and
        ``undefined`` (why, when ``rho`` is None: ``"needs 3 points or more"``, a constant
        property or gain).
    """
    from scipy import stats

    gains = sweep_result.gains()
    rows = []
    raw: dict[str, float] = {}  # unrounded p-values, for the Holm adjustment
    for name, values in properties.items():
        common = [p for p in gains if p in values]
        x = [values[p] for p in common]
        y = [gains[p] for p in common]
        rho = p_value = p_method = None
        if len(common) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                rho = float(stats.spearmanr(x, y).statistic)  # its p-value: computed below
            if len(common) <= EXACT_MAX_POINTS:
                p_value, p_method = spearman_exact_p(x, y), "exact"
            else:
                p_value, p_method = spearman_permutation_p(x, y), "permutation"
            rho = None if math.isnan(rho) else round(rho, 4)
            if math.isnan(p_value):
                p_value = p_method = None
            else:  # 4 significant digits: an exact p can be as small as 2 / 9! = 5.5e-06
                raw[name] = p_value
                p_value = float(f"{p_value:.4g}")
        why = ("needs 3 points or more" if len(common) < 3 else "the property is constant"
               if len(set(x)) <= 1 else "the gain is constant" if len(set(y)) <= 1 else None)
        rows.append({"property": name, "spearman_rho": rho, "p_value": p_value,
                     "p_method": p_method, "n_points": len(common),
                     "values": {p: round(values[p], 4) for p in common},
                     **({"undefined": why} if why else {})})
    adjusted = dict(zip(raw, holm(list(raw.values()))))
    for r in rows:
        p = adjusted.get(r["property"])
        r["p_holm"] = None if p is None else float(f"{p:.4g}")
    return rows


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``p_values`` for testing them together: the k-th
    smallest times the number not yet passed, ``m - k + 1``, made monotone and capped at 1. The
    family-wise error stays at the level under any dependence between the tests, as between
    properties that all follow depth.

    Examples:
        >>> holm([0.01, 0.04, 0.03, 0.2])
        [0.04, 0.09, 0.09, 0.2]
    """
    m = len(p_values)
    out = [0.0] * m
    running = 0.0
    for k, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - k) * p_values[i]))
        out[i] = round(running, 12)
    return out


def spearman_permutation_p(x: Sequence[float], y: Sequence[float], *,
                           permutations: int = PERMUTATIONS, seed: int = 0) -> float:
    """Monte Carlo two-sided permutation p-value of Spearman's rho: ``(1 + hits) / (1 +
    permutations)``, hits being the seeded random orderings of ``y``'s average ranks whose
    |rho| reaches the observed one (ties included, as :func:`spearman_exact_p`; never 0, and
    within ~``2 sqrt(p / permutations)`` of the exact value). The t-approximation it replaces
    was liberal with ties (5.5 % rejections at 0.05).
    """
    from scipy.stats import rankdata

    n = len(x)
    a = np.rint(2 * rankdata(x) - (n + 1)).astype(np.int64)
    b = np.rint(2 * rankdata(y) - (n + 1)).astype(np.int64)
    if n != len(b) or not a.any() or not b.any():
        return math.nan
    rng = np.random.default_rng(seed)
    shuffled = rng.permuted(np.broadcast_to(b, (permutations, n)), axis=1)
    hits = np.count_nonzero(np.abs(shuffled @ a) >= abs(int(a @ b)))
    return float(1 + hits) / (1 + permutations)


def spearman_exact_p(x: Sequence[float], y: Sequence[float]) -> float:
    """Exact two-sided permutation p-value of Spearman's rho between ``x`` and ``y``.

    The fraction of all n! pairings of ``y``'s average ranks with ``x``'s whose |rho| is at
    least the observed |rho| (the observed pairing counts). Ties are handled by the average
    ranks. Twice the average ranks, centred, are integers, so the comparison is exact.
    Deterministic; enumerates n! orderings, so meant for n <= :data:`EXACT_MAX_POINTS`.

    Examples:
        >>> round(spearman_exact_p([1, 2, 3, 4], [10, 20, 30, 40]), 4)  # 2 of 24 orderings
        0.0833
        >>> round(spearman_exact_p([1, 2, 3, 4], [10, 30, 20, 40]), 4)  # rho = 0.8: 8 of 24
        0.3333
    """
    from scipy.stats import rankdata

    n = len(x)
    if n != len(y) or n < 2:
        raise ConfigError(f"spearman_exact_p needs two samples of one length >= 2; got "
                          f"lengths {len(x)} and {len(y)}. Fix: pass paired values.")
    a = np.rint(2 * rankdata(x) - (n + 1)).astype(np.int64)  # 2 * (rank - mean rank)
    b = np.rint(2 * rankdata(y) - (n + 1)).astype(np.int64)
    if not a.any() or not b.any():
        return math.nan  # a constant sample: rho is undefined
    observed = abs(int(a @ b))
    null = np.abs(b[_permutations(n)] @ a)
    return float(np.count_nonzero(null >= observed)) / len(null)


@functools.lru_cache(maxsize=2)
def _permutations(n: int) -> np.ndarray:
    """All n! orderings of ``range(n)``, one per row (read-only; cached)."""
    perms = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(n))),
                        dtype=np.int8 if n < 128 else np.int64).reshape(-1, n)
    perms.flags.writeable = False
    return perms
