"""Sweep statistics, resumability, and the property join / Spearman predictors."""

from __future__ import annotations

import dataclasses
import itertools
import sys

import numpy as np
import pytest
from scipy import stats

import featlab
import featlab.testing as ft
from featlab.analysis.probe import probe_points
from featlab.analysis.similarity import cka_matrix
from featlab.cache.reader import open_cache
from featlab.errors import CacheError, ConfigError
from featlab.segment import runs
from featlab.segment.metrics import ConfusionMatrix
from featlab.segment.predict import (EXACT_MAX_POINTS, holm, predictors, property_table,
                                     spearman_exact_p, spearman_permutation_p)
from featlab.segment.sweep import (SweepResult, _miou, best_share, bootstrap_gain,
                                   gain_interval, gain_stats, sweep, sweep_difference,
                                   write_sweep)
from featlab.segment.train import train_head

from .conftest import SPEC

FAST = dict(epochs=1, batch_size=8, lr=0.01)


def test_gain_stats_is_a_paired_t_interval():
    skip, base = [0.50, 0.56, 0.53, 0.55], [0.48, 0.51, 0.52, 0.50]
    g = gain_stats(skip, base)
    d = np.subtract(skip, base)
    lo, hi = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert g["gain"] == pytest.approx(d.mean()) and g["std"] == pytest.approx(d.std(ddof=1))
    assert (g["lo"], g["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert np.isnan(gain_stats([0.5], [0.4])["lo"])


def test_stacked_miou_equals_confusion_matrix_miou():
    rng = np.random.default_rng(0)
    m = rng.integers(0, 50, (5, 4, 4))
    m[2, 3, :] = m[2, :, 3] = 0  # an absent class: left out of the mean
    for i in range(5):
        cm = ConfusionMatrix(4)
        cm.counts[:] = 0
        cm.counts += __import__("torch").as_tensor(m[i])
        assert _miou(m)[i] == pytest.approx(cm.miou())


def test_bootstrap_over_images_is_seeded_paired_and_brackets_the_gain():
    rng = np.random.default_rng(1)
    base = [rng.integers(0, 30, (40, 3, 3)) for _ in range(2)]
    better = [b + np.eye(3, dtype=np.int64)[None] * 20 for b in base]  # more true positives
    lo, hi = bootstrap_gain(better, base, n=300, seed=3)
    assert (lo, hi) == bootstrap_gain(better, base, n=300, seed=3)
    observed = np.mean([_miou(s.sum(0)) - _miou(b.sum(0)) for s, b in zip(better, base)])
    assert 0 < lo <= observed <= hi
    assert bootstrap_gain(base, base, n=50) == (0.0, 0.0)


def _best_share_by_loop(skips, base, n, seed):
    """best_share's resamples one at a time, mIoU from ConfusionMatrix (the same draws)."""
    import torch

    def miou(m):
        cm = ConfusionMatrix(m.shape[-1])
        cm.counts[:] = 0
        cm.counts += torch.as_tensor(m)
        return cm.miou()

    rng = np.random.default_rng([seed, 1])
    k, num = len(base), len(base[0])
    draws = [rng.integers(0, num, num) for _ in range(n)]
    picks = rng.integers(0, k, (n, k))
    wins = dict.fromkeys(skips, 0.0)
    for images, seeds in zip(draws, picks):
        gains = {p: np.mean([miou(v[s][images].sum(0)) - miou(base[s][images].sum(0))
                             for s in seeds]) for p, v in skips.items()}
        top = [p for p, g in gains.items() if g >= max(gains.values())]
        for p in top:
            wins[p] += 1 / len(top)
    return {p: w / n for p, w in wins.items()}


def test_best_share_resamples_images_and_seeds_together():
    rng = np.random.default_rng(4)
    base = [rng.integers(0, 30, (12, 3, 3)) for _ in range(3)]
    # two close points and a clearly worse one, with a different winner per seed
    skips = {"a": [b + np.eye(3, dtype=np.int64)[None] * g for b, g in zip(base, (9, 5, 9))],
             "b": [b + np.eye(3, dtype=np.int64)[None] * g for b, g in zip(base, (6, 9, 7))],
             "c": [b.copy() for b in base]}
    share = best_share(skips, base, n=60, seed=2)
    expected = _best_share_by_loop(skips, base, 60, 2)
    assert share == pytest.approx(expected, abs=1e-4)
    assert sum(share.values()) == pytest.approx(1.0) and share["c"] == 0.0
    assert 0.1 < share["a"] < 0.9  # neither wins every resample
    same = best_share({"x": skips["a"], "y": skips["a"]}, base, n=20)
    assert same == {"x": 0.5, "y": 0.5}  # a tie is split, not given to the first


def test_gain_interval_adds_the_seed_and_image_half_widths_in_quadrature():
    d, images = [0.012, 0.015, 0.013, 0.02], (0.004, 0.022)
    lo, hi = gain_interval(d, images)
    seeds = stats.t.ppf(0.975, 3) * np.std(d, ddof=1) / 2
    half = np.sqrt(seeds ** 2 + 0.009 ** 2)
    assert (lo, hi) == (pytest.approx(np.mean(d) - half), pytest.approx(np.mean(d) + half))
    assert hi - lo > max(2 * seeds, images[1] - images[0])  # wider than either alone
    # five points read together: each at 1 - 0.05/5, the image part by the normal quantiles
    lo5, hi5 = gain_interval(d, images, tests=5)
    seeds5 = stats.t.ppf(1 - 0.005, 3) * np.std(d, ddof=1) / 2
    images5 = 0.009 * stats.norm.ppf(1 - 0.005) / stats.norm.ppf(0.975)
    assert hi5 - lo5 == pytest.approx(2 * np.hypot(seeds5, images5))
    assert gain_interval([0.01], images) is None and gain_interval(d, None) is None


def _confusions(rng, counts, hard, logits):
    """Per-image confusion matrices ``[N, C, C]`` of a model whose per-class accuracy has the
    logits ``logits`` (+ each image's own difficulty ``hard``); errors go to the next class."""
    n, c = counts.shape
    right = rng.binomial(counts, 1 / (1 + np.exp(-(logits + hard))))
    m = np.zeros((n, c, c), np.int64)
    idx = np.arange(c)
    m[:, idx, idx] = right
    m[:, idx, (idx + 1) % c] = counts - right
    return m


def test_the_combined_interval_keeps_its_level_where_the_image_interval_does_not():
    """Null sweeps (skip and baseline heads drawn alike; each seed shifts the per-class accuracy
    as training seeds do): how often each interval excludes a gain of 0."""
    rng = np.random.default_rng(0)
    n, c, k, reps = 120, 5, 3, 80
    mean = np.r_[2.0, np.full(c - 1, -0.3)]
    excluded = {"images": 0, "both": 0}
    for _ in range(reps):
        counts = np.c_[rng.integers(400, 800, n), rng.integers(0, 150, (n, c - 1))]
        hard = rng.normal(0, 0.7, (n, c))  # shared by every head: the pairing over images
        skip, base = ([_confusions(rng, counts, hard, mean + 0.15 * rng.normal(size=c))
                       for _ in range(k)] for _ in range(2))
        images = bootstrap_gain(skip, base, n=200, seed=0)
        lo, hi = gain_interval([_miou(s.sum(0)) - _miou(b.sum(0)) for s, b in zip(skip, base)],
                               images)
        excluded["images"] += not images[0] <= 0 <= images[1]
        excluded["both"] += not lo <= 0 <= hi
    assert excluded["images"] / reps > 0.3  # blind to the seeds' spread
    assert excluded["both"] / reps <= 0.1  # nominal 0.05


def test_sweep_refuses_caches_heads_cannot_use_before_any_run(tmp_path):
    # a pooled cache used to be found after the baseline had been trained and recorded, whose
    # run then blocked a later sweep of other caches into the same folder
    for split, n in (("train", 16), ("val", 8)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(), ds, "all", tmp_path / f"{split}.h5", spec=SPEC,
                        max_size=4, num_workers=0, progress=False)
    with pytest.raises(CacheError, match="point 'relu' must be stored at full size"):
        sweep(tmp_path / "train.h5", tmp_path / "val.h5", points="relu", seeds=1,
              out=tmp_path / "sweep", progress=False, **FAST)
    assert not (tmp_path / "sweep").exists()


def test_one_seed_leaves_the_seed_statistics_undefined_not_false(caches, tmp_path):
    r = sweep(*caches, points="stages", seeds=1, out=tmp_path / "one", progress=False,
              bootstrap=50, **FAST)
    row = r.rows()[1]
    assert row["gain_ci_seeds"] is None and row["beats_2std"] is None and row["gain_std"] is None
    assert row["gain_ci"] is None and row["gain_ci_all_points"] is None  # seeds' spread unknown
    import csv

    with open(write_sweep(r)[1], newline="") as f:
        written = list(csv.DictReader(f))[1]
    assert written["beats_2std"] == written["gain_ci_seeds"] == ""  # like other missing cells
    with pytest.raises(ConfigError, match="seeds must be a positive count .* Fix: e.g. --seeds"):
        sweep(*caches, seeds=0, out=tmp_path / "none", progress=False, **FAST)
    # a keyword that is no head setting: named, with the fields, not dataclasses' TypeError
    with pytest.raises(ConfigError, match="sweep's keyword options must be HeadSettings fields "
                                          r"\(skip, .*\); got 'properties'\."):
        sweep(*caches, out=tmp_path / "none", progress=False, properties=False, **FAST)
    with pytest.raises(ConfigError, match="train_head's .*got 'epoch'. Did you mean 'epochs'"):
        train_head(*caches, out=tmp_path / "none", progress=False, epoch=1)
    assert not (tmp_path / "none").exists()


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


def test_sweep_table_files_and_resume(caches, tmp_path, reads):
    out = tmp_path / "sweep"
    r = sweep(*caches, points="stages", seeds=2, out=out, progress=False, bootstrap=200, **FAST)
    # 4 runs share one preload: each cache's last point, labels and layer1.0 read once (20 reads
    # when every run preloads its own)
    assert sorted(reads) == sorted((split, name) for split in ("train", "val") for name in (
        "points/layer1.1", "labels", "points/layer1.0"))
    assert repr(r).startswith("SweepResult(1 point x 2 seeds: baseline mIoU ") and (
        f"folder={str(out)!r})" in repr(r))
    assert r.points == ("layer1.0",) and r.seeds == (0, 1) and len(r.baseline) == 2
    rows = r.rows()
    assert [row["point"] for row in rows] == ["baseline", "layer1.0"]
    row = rows[1]
    assert row["gain"] == pytest.approx(np.mean(np.subtract(r.skips["layer1.0"], r.baseline)),
                                        abs=1e-4)
    assert row["rank"] == 1 and row["stride"] == 2 and len(row["per_seed"]) == 2
    assert isinstance(row["beats_2std"], bool) and len(row["gain_ci_images"]) == 2
    d = np.subtract(r.skips["layer1.0"], r.baseline)
    assert row["gain_ci"] == list(gain_interval(d, row["gain_ci_images"]))
    assert row["gain_ci_all_points"] == list(gain_interval(d, row["gain_ci_images"], tests=1))
    assert r.p_best == {"layer1.0": 1.0} and row["p_best"] == 1.0  # the only point
    # a record written before p_best reads back without it
    old = {k: v for k, v in r.to_dict().items() if k != "p_best"}
    assert SweepResult.from_dict(old).p_best == {} and SweepResult.from_dict(old).rows()[1][
        "p_best"] is None
    # the shared settings: the per-run seed and skip are the record's seeds and points
    assert "seed" not in r.settings and "skip" not in r.settings and r.settings["epochs"] == 1
    assert sweep_difference(r, *caches, "stages", 2, bootstrap=200, **FAST) is None
    older = dataclasses.replace(r, settings={**r.settings, "seed": 0, "skip": None})
    assert sweep_difference(older, *caches, "stages", 2, bootstrap=200, **FAST) is None
    paths = write_sweep(r)
    assert SweepResult.from_dict(__import__("json").loads(paths[0].read_text())) == r
    assert paths[1].read_text().splitlines()[0].startswith("point,stride,rf_size,miou_mean")
    # resumable: finished runs are reused, a missing one is trained again
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/run.json")}
    assert len(stamp) == 4
    gone = out / "runs" / "skip-layer1.0-sum-seed1"
    (gone / runs.RUN_JSON).unlink()
    again = sweep(*caches, points="stages", seeds=2, out=out, progress=False, bootstrap=200,
                  **FAST)
    assert again.skips == r.skips and again.baseline == r.baseline
    for path, t in stamp.items():
        if path.parent != gone:
            assert path.stat().st_mtime_ns == t


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
