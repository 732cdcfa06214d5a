"""The property join (per-point properties of caches) and the Spearman predictors of the gain."""

from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
from scipy import stats

from featlab.analysis.probe import probe_points
from featlab.analysis.similarity import cka_matrix
from featlab.cache.reader import open_cache
from featlab.report.tables import (EXACT_MAX_POINTS, holm, predictors, property_table,
                                   spearman_exact_p, spearman_permutation_p)


@pytest.fixture(scope="session")
def caches(tmp_path_factory):
    from tests.unit.segment.conftest import make_caches

    return make_caches(tmp_path_factory.mktemp("tablecaches"))


def test_predictors_say_why_a_correlation_is_undefined():
    class R:
        def gains(self):
            return {"a": 0.01, "b": 0.03, "c": 0.02}

    rows = {r["property"]: r for r in predictors(R(), {"two": {"a": 1.0, "b": 2.0},
                                                       "flat": {p: 1.0 for p in "abc"},
                                                       "stride": {"a": 2, "b": 8, "c": 4}})}
    assert rows["two"]["undefined"] == "needs 3 points or more"
    assert rows["flat"]["undefined"] == "the property is constant"
    assert "undefined" not in rows["stride"] and rows["stride"]["spearman_rho"] == 1.0


def test_property_table_skips_missing_modules_with_a_note(caches, monkeypatch):
    for name in ("featlab.analysis.probe", "featlab.analysis.resolution",
                 "featlab.analysis.similarity"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    notes = []
    table = property_table(*caches, points="all", notes=notes)
    assert set(table) == {"depth", "stride", "rf_size", "channels"}
    assert table["stride"] == {"conv1": 2.0, "bn1": 2.0, "relu": 2.0, "layer1.0": 2.0}
    assert table["depth"] == {"conv1": 0.0, "bn1": 1.0, "relu": 2.0, "layer1.0": 3.0}
    assert len(notes) == 3 and all("skipped" in n for n in notes)


def test_property_table_joins_the_analyses_that_exist(caches):
    notes, how = [], {}
    table = property_table(*caches, points="all", notes=notes, provenance=how)
    assert not notes, notes
    assert set(table) == {"depth", "stride", "rf_size", "channels", "resolution_ceiling",
                          "cka_to_last", "probe_miou"}
    assert set(table["probe_miou"]) == {"conv1", "bn1", "relu", "layer1.0"}
    assert all(0 <= v <= 1 for v in table["resolution_ceiling"].values())
    # what produced the values is recorded: the caches, and the probe's chosen strengths
    assert how["points"] == ["conv1", "bn1", "relu", "layer1.0"] and how["seed"] == 0
    assert how["val"]["ids_sha256"] == open_cache(caches[1]).identity()["ids_sha256"]
    assert set(how["measured"]) == set(table)
    assert how["measured"]["cka_to_last"]["to"] == "layer1.1"
    assert how["measured"]["cka_to_last"]["estimator"] == "debiased"  # not inflated by width
    debiased = cka_matrix(caches[1], kind="linear", estimator="debiased", progress=False)
    names = list(debiased.names)
    assert table["cka_to_last"]["bn1"] == pytest.approx(
        np.asarray(debiased.matrix)[names.index("bn1"), names.index("layer1.1")])
    probed = probe_points(*caches, points=list(table["probe_miou"]), seed=0, progress=False)
    assert how["measured"]["probe_miou"]["alpha"] == {s.point: s.alpha for s in probed.scores}
    assert how["measured"]["probe_miou"]["settings"] == probed.settings


def test_predictors_are_spearman_correlations_over_points():
    class R:
        def gains(self):
            return {"a": 0.01, "b": 0.04, "c": 0.02, "d": 0.03}

    props = {"stride": {"a": 2, "b": 16, "c": 4, "d": 8}, "flat": {p: 1.0 for p in "abcd"},
             "two": {"a": 1.0, "b": 2.0}}
    rows = {r["property"]: r for r in predictors(R(), props)}
    rho, _ = stats.spearmanr([2, 16, 4, 8], [0.01, 0.04, 0.02, 0.03])
    assert rows["stride"]["spearman_rho"] == pytest.approx(rho) == 1.0
    # 4 points: exact, 2 of the 4! orderings reach |rho| = 1 (the t-approximation says 0.0)
    assert rows["stride"]["p_value"] == pytest.approx(2 / 24, abs=1e-4)
    assert rows["stride"]["p_method"] == "exact"
    assert rows["flat"]["spearman_rho"] is None and rows["two"]["n_points"] == 2
    assert rows["flat"]["p_value"] is None and rows["flat"]["p_method"] is None
    assert rows["two"]["p_value"] is None and rows["two"]["p_method"] is None
    # one property tested: Holm leaves its p alone; untested ones get none
    assert rows["stride"]["p_holm"] == rows["stride"]["p_value"]
    assert rows["flat"]["p_holm"] is None and rows["two"]["p_holm"] is None


def _holm_by_definition(p):
    """Holm's adjusted p: the smallest level at which its step-down procedure rejects."""
    m, order = len(p), np.argsort(p, kind="stable")
    out = np.empty(m)
    for rank, i in enumerate(order):
        out[i] = min(1.0, max((m - j) * p[order[j]] for j in range(rank + 1)))
    return out


def test_holm_adjusts_the_properties_tested_together():
    rng = np.random.default_rng(1)
    for p in ([0.01, 0.04, 0.03, 0.2], [0.5, 0.5, 0.01], rng.uniform(0, 0.3, 7)):
        np.testing.assert_allclose(holm(list(p)), _holm_by_definition(np.asarray(p)),
                                   rtol=1e-12)
    # in predictors: every property with a p-value, adjusted as one family (from unrounded p)
    gains = {"a": 0.01, "b": 0.04, "c": 0.02, "d": 0.03, "e": 0.05}
    props = {"depth": {"a": 0, "b": 3, "c": 1, "d": 2, "e": 4},
             "width": {"a": 64, "b": 64, "c": 128, "d": 128, "e": 256},
             "flat": {p: 1.0 for p in gains}}
    rows = predictors(_Gains(gains), props)
    raw = [spearman_exact_p(list(props[n].values()), list(gains.values()))
           for n in ("depth", "width")]
    expected = _holm_by_definition(np.asarray(raw))
    assert [r["p_holm"] for r in rows[:2]] == pytest.approx(expected, rel=1e-3)
    assert rows[2]["p_holm"] is None
    assert rows[0]["p_holm"] == pytest.approx(2 * rows[0]["p_value"], rel=1e-3)  # the smallest


def _brute_force_spearman_p(x, y):
    """Two-sided permutation p of Spearman's rho, enumerating all n! orderings of y."""
    def avg_ranks(v):  # 1-based ranks, ties get the mean of the ranks they span
        v = np.asarray(v, dtype=float)
        return np.array([(v < t).sum() + ((v == t).sum() + 1) / 2 for t in v])

    rx, ry = avg_ranks(x), avg_ranks(y)
    observed = abs(np.corrcoef(rx, ry)[0, 1])
    perms = list(itertools.permutations(range(len(y))))
    hits = sum(abs(np.corrcoef(rx, ry[list(p)])[0, 1]) >= observed - 1e-12 for p in perms)
    return hits / len(perms)


class _Gains:
    def __init__(self, gains):
        self._gains = gains

    def gains(self):
        return self._gains


@pytest.mark.parametrize("x, y, expected", [
    ([2, 16, 4, 8], [0.01, 0.04, 0.02, 0.03], 2 / 24),          # rho = 1
    ([2, 4, 8, 16], [0.01, 0.03, 0.02, 0.04], 8 / 24),          # rho = 0.8
    ([16, 8, 4, 2], [0.01, 0.03, 0.02, 0.04], 8 / 24),          # rho = -0.8
    ([64, 64, 128, 256], [0.01, 0.02, 0.03, 0.04], 4 / 24),     # tie in x: rho = 0.9487
    # ties in both, rho = 31/38 = 0.8158; the null is skewed (4 orderings reach -36/38, only 4
    # reach +31/38 or more), so 2 * min(one-sided p) would say 16/120, not 12/120
    ([1, 2, 2, 3, 5], [0.1, 0.1, 0.2, 0.4, 0.3], 12 / 120),
    ([3, 1, 4, 1, 5, 9], [0.2, 0.7, 0.1, 0.8, 0.2, 0.8], 584 / 720),  # ties, rho = -0.1343
])
def test_predictors_p_value_is_the_exact_permutation_p(x, y, expected):
    points = [f"p{i}" for i in range(len(x))]
    (row,) = predictors(_Gains(dict(zip(points, y))), {"prop": dict(zip(points, x))})
    brute = _brute_force_spearman_p(x, y)
    assert brute == pytest.approx(expected, abs=1e-12)
    assert row["p_method"] == "exact" and row["n_points"] == len(x)
    assert row["p_value"] == pytest.approx(brute, rel=1e-3)
    assert row["spearman_rho"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-4)
    assert spearman_exact_p(x, y) == pytest.approx(brute, abs=1e-12)


def test_predictors_p_value_is_exact_up_to_9_points_then_a_permutation_test():
    assert EXACT_MAX_POINTS == 9
    rng = np.random.default_rng(0)
    for n, method in ((9, "exact"), (10, "permutation"), (12, "permutation")):
        x = rng.permutation(n).astype(float)
        x[:3] = x[0]  # ties, where the t-approximation was liberal
        y = x + rng.normal(0, 3, n)
        points = [f"p{i}" for i in range(n)]
        (row,) = predictors(_Gains(dict(zip(points, y))), {"prop": dict(zip(points, x))})
        res = stats.spearmanr(x, y)
        assert row["p_method"] == method and row["n_points"] == n
        assert row["spearman_rho"] == pytest.approx(res.statistic, abs=1e-4)
        if n == 10:  # 10! orderings can still be counted: the Monte Carlo p is close to them
            exact = spearman_exact_p(x, y)
            assert row["p_value"] == pytest.approx(exact, abs=4 * np.sqrt(exact / 1e5) + 1e-5)
    assert spearman_permutation_p(np.arange(12.0), np.arange(12.0)) == 1 / 100_001  # never 0
    # 9 points, rho = 1: exactly 2 of 9! orderings, kept to 4 significant digits (not 0.0)
    points = [f"p{i}" for i in range(9)]
    (row,) = predictors(_Gains({p: float(i) for i, p in enumerate(points)}),
                        {"prop": {p: 2.0 ** i for i, p in enumerate(points)}})
    assert row["p_method"] == "exact" and row["p_value"] == pytest.approx(2 / 362880, rel=1e-3)
