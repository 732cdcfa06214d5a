"""Sweep statistics, resumability, and the property join / Spearman predictors."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from scipy import stats

from featlab.segment import runs
from featlab.segment.metrics import ConfusionMatrix
from featlab.segment.predict import predictors, property_table
from featlab.segment.sweep import (SweepResult, _miou, bootstrap_gain, gain_stats, sweep,
                                   write_sweep)

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


def test_sweep_table_files_and_resume(caches, tmp_path):
    out = tmp_path / "sweep"
    r = sweep(*caches, points="stages", seeds=2, out=out, progress=False, bootstrap=200, **FAST)
    assert r.points == ("layer1.0",) and r.seeds == (0, 1) and len(r.baseline) == 2
    rows = r.rows()
    assert [row["point"] for row in rows] == ["baseline", "layer1.0"]
    row = rows[1]
    assert row["gain"] == pytest.approx(np.mean(np.subtract(r.skips["layer1.0"], r.baseline)),
                                        abs=1e-4)
    assert row["rank"] == 1 and row["stride"] == 2 and len(row["per_seed"]) == 2
    assert isinstance(row["beats_2std"], bool) and len(row["gain_ci_images"]) == 2
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
    assert set(table) == {"stride", "rf_size", "channels"}
    assert table["stride"] == {"conv1": 2.0, "bn1": 2.0, "relu": 2.0, "layer1.0": 2.0}
    assert len(notes) == 3 and all("skipped" in n for n in notes)


def test_property_table_joins_the_analyses_that_exist(caches):
    notes = []
    table = property_table(*caches, points="all", notes=notes)
    assert not notes, notes
    assert set(table) == {"stride", "rf_size", "channels", "resolution_ceiling", "cka_to_last",
                          "probe_miou"}
    assert set(table["probe_miou"]) == {"conv1", "bn1", "relu", "layer1.0"}
    assert all(0 <= v <= 1 for v in table["resolution_ceiling"].values())


def test_predictors_are_spearman_correlations_over_points():
    class R:
        def gains(self):
            return {"a": 0.01, "b": 0.04, "c": 0.02, "d": 0.03}

    props = {"stride": {"a": 2, "b": 16, "c": 4, "d": 8}, "flat": {p: 1.0 for p in "abcd"},
             "two": {"a": 1.0, "b": 2.0}}
    rows = {r["property"]: r for r in predictors(R(), props)}
    rho, p = stats.spearmanr([2, 16, 4, 8], [0.01, 0.04, 0.02, 0.03])
    assert rows["stride"]["spearman_rho"] == pytest.approx(rho) == 1.0
    assert rows["stride"]["p_value"] == pytest.approx(p, abs=1e-4)
    assert rows["flat"]["spearman_rho"] is None and rows["two"]["n_points"] == 2
