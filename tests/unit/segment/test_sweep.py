"""Sweep statistics and resumability (the property join: tests/unit/report)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import stats

import featlab
import featlab.testing as ft
from featlab.errors import CacheError, ConfigError
from featlab.segment import runs
from featlab.segment.metrics import ConfusionMatrix, _iou
from featlab.segment.sweep import (SweepResult, _image_totals, _image_weights, _resampled_miou,
                                   best_share, bootstrap_gain, gain_interval, gain_stats, sweep,
                                   sweep_difference, write_sweep)
from featlab.segment.train import train_head

from .conftest import SPEC

FAST = dict(epochs=1, batch_size=8, lr=0.01)


def _miou(m):
    """The data-set mIoU of each of stacked confusion matrices ``[..., C, C]`` (metrics' IoU)."""
    return np.nanmean(_iou(m), axis=-1)


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


def test_resampled_miou_is_the_miou_of_the_resampled_confusion_matrices_bit_for_bit():
    rng = np.random.default_rng(4)
    per_seed = [rng.integers(0, 40, (30, 5, 5)) for _ in range(3)]
    for m in per_seed:
        m[:, 4, :] = m[:, :, 4] = 0  # a class absent everywhere: NaN, left out of the mean
        m[:29, 3, :] = m[:29, :, 3] = 0  # one present in a single image
    weights = _image_weights(np.random.default_rng(0), 30, 200)
    summed = np.einsum("bn,snij->bsij", weights, np.stack(per_seed).astype(np.float64))
    np.testing.assert_array_equal(
        _resampled_miou(weights, [_image_totals(m) for m in per_seed]), _miou(summed))
    assert np.isnan(_iou(summed)[..., 3]).any()  # some resamples drew none of class 3's images


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


