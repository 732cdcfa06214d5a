"""What predicts a skip point's usefulness: join cheap per-point properties with sweep gains.

:func:`property_table` gathers, per skip point, the properties featlab measures elsewhere:
``stride``, ``rf_size`` and ``channels`` (from the cache's skip-point records),
``resolution_ceiling`` (the best mIoU reachable at the point's stride,
:mod:`featlab.analysis.resolution`), ``cka_to_last`` (linear CKA with the last point,
:mod:`featlab.analysis.similarity`) and ``probe_miou`` (a per-pixel linear probe,
:mod:`featlab.analysis.probe`). A property whose module is missing or fails is left out with a
logged note, so a sweep never loses its result to an analysis. :func:`predictors` reports the
Spearman correlation of each property with the gain across points.

Examples:
    >>> class R:  # a stand-in for a SweepResult
    ...     def gains(self): return {"a": 0.01, "b": 0.03, "c": 0.02}
    >>> rows = predictors(R(), {"stride": {"a": 2, "b": 8, "c": 4}})
    >>> rows[0]["property"], rows[0]["spearman_rho"], rows[0]["n_points"]
    ('stride', 1.0, 3)
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("featlab")

__all__ = ["property_table", "predictors", "PROPERTIES"]

PROPERTIES = ("stride", "rf_size", "channels", "resolution_ceiling", "cka_to_last", "probe_miou")


def property_table(train_cache, val_cache, points: str | Sequence[str] | None = None, *,
                   include: Sequence[str] = PROPERTIES, seed: int = 0,
                   notes: list | None = None) -> dict[str, dict[str, float]]:
    """``{property: {point: value}}`` for the points (default: all but the last).

    Args:
        train_cache, val_cache: the sweep's caches (paths or readers).
        points: a selection over the cache's points.
        include: which properties to compute (see :data:`PROPERTIES`).
        seed: passed to the analyses that draw random numbers.
        notes: if given, one string per skipped property is appended (also logged).
    """
    from featlab.cache.reader import open_cache

    train = train_cache if hasattr(train_cache, "select") else open_cache(train_cache)
    val = val_cache if hasattr(val_cache, "select") else open_cache(val_cache)
    last = val.point_names[-1]
    names = [p for p in val.select(points) if p != last]
    records = {p.name: p for p in val.points}
    table: dict[str, dict[str, float]] = {}
    for key in ("stride", "rf_size", "channels"):
        if key in include:
            table[key] = {p: float(getattr(records[p], key)) for p in names
                          if getattr(records[p], key) is not None}
    jobs = {"resolution_ceiling": lambda: _ceiling(val, names),
            "cka_to_last": lambda: _cka(val, names, last),
            "probe_miou": lambda: _probe(train, val, names, seed)}
    for key, job in jobs.items():
        if key not in include:
            continue
        try:
            table[key] = job()
        except ImportError as err:
            _note(notes, f"{key} skipped: its module is not available ({err})")
        except Exception as err:  # an analysis failing must not cost the sweep its result
            _note(notes, f"{key} skipped: {type(err).__name__}: {err}")
    return table


def _note(notes: list | None, text: str) -> None:
    log.warning("property_table: %s", text)
    if notes is not None:
        notes.append(text)


def _ceiling(val, names: list[str]) -> dict[str, float]:
    from featlab.analysis.resolution import resolution_table

    rows = {r["point"]: r for r in resolution_table(val, progress=False).rows()}
    return {p: float(rows[p]["ceiling_miou"]) for p in names
            if rows.get(p, {}).get("ceiling_miou") is not None}


def _cka(val, names: list[str], last: str) -> dict[str, float]:
    from featlab.analysis.similarity import cka_matrix

    r = cka_matrix(val, kind="linear", progress=False)
    rows, cols = list(r.names), list(getattr(r, "columns", None) or r.names)
    j = cols.index(last)
    return {p: float(np.asarray(r.matrix)[rows.index(p), j]) for p in names if p in rows}


def _probe(train, val, names: list[str], seed: int) -> dict[str, float]:
    from featlab.analysis.probe import probe_points

    result = probe_points(train, val, points=names, seed=seed, progress=False)
    rows = {r["point"]: r for r in result.rows()}
    return {p: float(rows[p]["miou"]) for p in names if p in rows}


def predictors(sweep_result, properties: dict[str, dict[str, float]]) -> list[dict]:
    """Spearman correlation of each property with the mean gain, across points.

    Args:
        sweep_result: a :class:`~featlab.segment.sweep.SweepResult` (anything with ``gains()``).
        properties: ``{property: {point: value}}`` (:func:`property_table`).

    Returns:
        One dict per property: ``property``, ``spearman_rho``, ``p_value`` (None when fewer
        than 3 points or a constant property), ``n_points``, ``values`` (the joined points).
    """
    from scipy import stats

    gains = sweep_result.gains()
    rows = []
    for name, values in properties.items():
        common = [p for p in gains if p in values]
        x = [values[p] for p in common]
        y = [gains[p] for p in common]
        rho = p_value = None
        if len(common) >= 3 and len(set(x)) > 1 and len(set(y)) > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                res = stats.spearmanr(x, y)
            rho, p_value = float(res.statistic), float(res.pvalue)
            rho = None if math.isnan(rho) else round(rho, 4)
            p_value = None if math.isnan(p_value) else round(p_value, 4)
        rows.append({"property": name, "spearman_rho": rho, "p_value": p_value,
                     "n_points": len(common),
                     "values": {p: round(values[p], 4) for p in common}})
    return rows
