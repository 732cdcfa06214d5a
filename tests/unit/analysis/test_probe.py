"""PixelProbe and probe_points: checked against scikit-learn and against direct computations."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression

import featlab
import featlab.testing as ft
from featlab.analysis._logreg import sklearn_C
from featlab.analysis._pixels import bilinear_at
from featlab.analysis.probe import (PixelProbe, ProbeResult, probe_points, read_result,
                                    write_result)
from featlab.errors import CacheError, ConfigError, FeatlabWarning
from featlab.models import BackboneSpec
from featlab.segment.metrics import ConfusionMatrix

SPEC = BackboneSpec("tiny", "none", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, 10)


def blobs(n=3000, c=12, k=4, sep=0.6, seed=0, scale=None):
    """Overlapping Gaussian classes (accuracy well below 100%, so differences show)."""
    centers = np.random.default_rng(100 + c + k).normal(size=(k, c)) * sep  # same per (c, k)
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    X = centers[y] + rng.normal(size=(n, c))
    if scale is not None:
        X = X * scale
    return X.astype(np.float32), y


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    net = ft.TinyResNet()
    out = {}
    for split, n in (("train", 12), ("val", 8)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(net, ds, "all", root / f"{split}.h5", spec=SPEC, batch_size=8,
                        dtype="float32", num_workers=0, progress=False)
        out[split] = featlab.open_cache(root / f"{split}.h5")
    return out


# ---- the pixel model ------------------------------------------------------------------------
@pytest.mark.parametrize("src,dst", [((4, 5), (11, 16)), ((8, 8), (32, 32)), ((3, 3), (3, 3)),
                                     ((5, 7), (4, 6))])
def test_bilinear_at_equals_interpolate(src, dst):
    g = torch.Generator().manual_seed(1)
    f = torch.randn(3, 6, *src, generator=g)
    up = F.interpolate(f, size=dst, mode="bilinear", align_corners=False)
    b, y, x = torch.meshgrid(torch.arange(3), torch.arange(dst[0]), torch.arange(dst[1]),
                             indexing="ij")
    got = bilinear_at(f, b.flatten(), y.flatten(), x.flatten(), dst)
    torch.testing.assert_close(got, up.permute(0, 2, 3, 1).reshape(-1, 6), atol=1e-5, rtol=0)


# ---- against scikit-learn --------------------------------------------------------------------
@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_matches_sklearn_logistic_regression(class_weight):
    X, y = blobs(scale=np.linspace(0.5, 3, 12))
    y[y == 3] = np.where(np.arange((y == 3).sum()) % 3 == 0, 3, 0)  # imbalance for "balanced"
    Xv, yv = blobs(seed=1, scale=np.linspace(0.5, 3, 12))
    yv[yv == 3] = 0
    alpha = 1e-3
    probe = PixelProbe(alpha, standardize=False, class_weight=class_weight, device="cpu",
                       dtype="float64", tol=1e-6, max_iter=500).fit(X, y)
    # scikit-learn's C for the same L2: sum of sample weights = n (balanced weights sum to n)
    sk = LogisticRegression(C=sklearn_C(alpha, len(y)), class_weight=class_weight, tol=1e-8,
                            max_iter=2000).fit(X, y)
    assert abs(probe.score(Xv, yv) - sk.score(Xv, yv)) <= 0.005
    assert 0.4 < sk.score(Xv, yv) < 0.95  # a problem where a wrong model would show
    # the same optimum: (multinomial coefficients are unique under L2)
    np.testing.assert_allclose(probe.coef_, sk.coef_, atol=2e-3)
    np.testing.assert_allclose(probe.intercept_, sk.intercept_, atol=2e-3)


def test_standardized_probe_matches_sklearn_on_scaled_features():
    X, y = blobs(scale=np.geomspace(0.01, 100, 12))
    Xv, yv = blobs(seed=1, scale=np.geomspace(0.01, 100, 12))
    probe = PixelProbe(1e-3, device="cpu", dtype="float64", tol=1e-6).fit(X, y)
    mean, std = X.mean(0), X.std(0)
    sk = LogisticRegression(C=sklearn_C(1e-3, len(y)), tol=1e-8, max_iter=2000).fit(
        (X - mean) / std, y)
    assert abs(probe.score(Xv, yv) - sk.score((Xv - mean) / std, yv)) <= 0.005
    np.testing.assert_allclose(probe.coef_ * std, sk.coef_, atol=2e-3)  # folded weights


def test_float32_default_solver_within_half_a_point_of_sklearn():
    X, y = blobs(n=4000, c=16, k=5, seed=3)
    Xv, yv = blobs(n=4000, c=16, k=5, seed=4)
    probe = PixelProbe(1e-4, device="cpu").fit(X, y)
    sk = LogisticRegression(C=sklearn_C(1e-4, len(y)), max_iter=1000).fit(X, y)
    assert abs(probe.score(Xv, yv) - sk.score(Xv, yv)) <= 0.005


# ---- image-shaped data -----------------------------------------------------------------------
@pytest.mark.parametrize("stride", [1, 2, 4, 8])
def test_sign_of_channel_zero_is_learned_at_every_stride(stride):
    """R-10.2: class = sign of channel 0 (at label resolution) -> > 99% pixel accuracy."""
    g = torch.Generator().manual_seed(stride)
    size = 32
    feats = torch.randn(8, 6, size // stride, size // stride, generator=g)
    up = F.interpolate(feats[:, :1], size=(size, size), mode="bilinear", align_corners=False)
    labels = (up[:, 0] > 0).to(torch.uint8)
    labels[:, :2] = 255  # ignored rows never count
    probe = PixelProbe(1e-5, device="cpu").fit(feats[:6].numpy(), labels[:6].numpy())
    assert probe.score(feats[6:].numpy(), labels[6:].numpy()) > 0.99
    cm = probe.evaluate(feats[6:].numpy(), labels[6:].numpy())
    assert cm.matrix.sum() == 2 * 30 * 32


@pytest.mark.parametrize("class_weight", [None, "balanced"])
def test_image_fit_is_pixel_fit_on_bilinear_features(class_weight):
    """Every pixel kept: the dense path (whole logit maps upsampled) fits the pixel problem."""
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(5, 5, 4, 4)).astype(np.float32)
    labels = rng.integers(0, 3, size=(5, 8, 8)).astype(np.uint8)
    labels[0, :3] = 255
    labels[3] = 255  # an image without training pixels drops out of the grid
    labels[labels == 2] = np.where(rng.random((labels == 2).sum()) < 0.3, 2, 1)  # imbalance
    kw = dict(device="cpu", dtype="float64", tol=1e-7, class_weight=class_weight)
    img = PixelProbe(1e-3, **kw).fit(feats, labels)
    up = F.interpolate(torch.from_numpy(feats), size=(8, 8), mode="bilinear",
                       align_corners=False).permute(0, 2, 3, 1).reshape(-1, 5).numpy()
    flat = labels.reshape(-1)
    pix = PixelProbe(1e-3, **kw).fit(up, flat)
    np.testing.assert_allclose(img.coef_, pix.coef_, atol=1e-4)
    assert img.n_pixels_ == (flat != 255).sum()
    assert img.predict(feats).shape == (5, 8, 8)
    logits = img.decision_function(feats)
    expected = np.einsum("nchw,kc->nkhw", feats, img.coef_) + img.intercept_[:, None, None]
    expected = F.interpolate(torch.from_numpy(expected), size=(8, 8), mode="bilinear",
                             align_corners=False).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(img.predict_proba(feats).sum(1), 1.0, atol=1e-5)


def test_interpolated_logits_have_the_same_gradient_every_run():
    """A pixel's logits are its cells' interpolated. The gather's gradient must not depend on
    how the CPU threads race: with ``logits[idx]`` (an accumulating ``index_put_``) the same
    fit differed between runs by ~1e-3 in its coefficients."""
    from featlab.analysis._logreg import _interpolate_cells

    g = torch.Generator().manual_seed(0)
    cells = torch.randn(2048, 9, generator=g)
    idx = torch.randint(0, 2048, (100_000, 4), generator=g)
    w = torch.rand(100_000, 4, generator=g)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(3):
            leaf = cells.clone().requires_grad_(True)
            _interpolate_cells(leaf, idx, w).square().sum().backward()
            grads.append(leaf.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], other) for other in grads[1:])
    plain = cells.clone().requires_grad_(True)
    (plain[idx] * w[:, :, None]).sum(1).square().sum().backward()
    torch.testing.assert_close(grads[0], plain.grad, rtol=1e-4, atol=1e-4)  # to float rounding


@pytest.mark.parametrize("hw,size", [((4, 5), (11, 16)), ((8, 8), (64, 64)), ((3, 3), (3, 3)),
                                     ((20, 20), (40, 40)), ((5, 7), (4, 6))])
def test_logit_upsampling_equals_interpolate(hw, size):
    from featlab.analysis._logreg import _Upsample

    x = torch.randn(3, 4, *hw, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    up = _Upsample.build(hw, size, "cpu", torch.float64)
    assert (up.rows is None) == (hw == (20, 20))  # big grids fall back to F.interpolate
    expected = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    torch.testing.assert_close(up(x), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("shuffle", [False, True])
def test_dense_sample_label_map_holds_the_training_labels(shuffle):
    from featlab.analysis._pixels import sample_pixels

    rng = np.random.default_rng(3)
    feats = rng.normal(size=(4, 3, 2, 2)).astype(np.float32)
    labels = rng.integers(0, 4, size=(4, 6, 6)).astype(np.uint8)
    labels[1] = 255
    labels[2, :2] = 255
    s = sample_pixels(feats, labels, max_pixels=None, seed=0, ignore_index=255, batch_size=3,
                      shuffle_labels=shuffle)
    keep = [0, 2, 3]
    assert s.grid == (3, 2, 2) and s.label_map.shape == (3, 6, 6)
    np.testing.assert_array_equal(s.cells, feats[keep].transpose(0, 2, 3, 1).reshape(-1, 3))
    np.testing.assert_array_equal(s.label_map == 255, labels[keep] == 255)
    np.testing.assert_array_equal(s.label_map[s.label_map != 255], s.y)
    same = np.array_equal(s.y, labels[keep][labels[keep] != 255])
    assert same != shuffle
    sparse = sample_pixels(feats, labels, max_pixels=50, seed=0, ignore_index=255, batch_size=3)
    assert sparse.grid is None and sparse.label_map is None


def test_subsampling_is_seeded_and_bounded():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(6, 4, 4, 4)).astype(np.float32)
    labels = (rng.random((6, 16, 16)) > 0.5).astype(np.uint8)
    a = PixelProbe(1e-3, max_pixels=300, seed=5, device="cpu", batch_size=4).fit(feats, labels)
    b = PixelProbe(1e-3, max_pixels=300, seed=5, device="cpu", batch_size=2).fit(feats, labels)
    c = PixelProbe(1e-3, max_pixels=300, seed=6, device="cpu").fit(feats, labels)
    assert a.n_pixels_ == 300
    np.testing.assert_array_equal(a.coef_, b.coef_)  # batch size does not change the sample
    assert not np.array_equal(a.coef_, c.coef_)


def test_alpha_is_chosen_on_held_out_data():
    X, y = blobs(n=2000, c=30, k=3, sep=0.3)
    probe = PixelProbe(alphas=(1e-4, 1e-2, 10.0), device="cpu").fit(X, y)
    assert set(probe.alpha_scores_) == {1e-4, 1e-2, 10.0}
    assert probe.alpha_ == max(probe.alpha_scores_, key=probe.alpha_scores_.get)
    assert probe.alpha_ != 10.0  # a crushing penalty cannot win on this data


def test_sklearn_conventions():
    probe = PixelProbe(1e-3, max_pixels=1000, device="cpu")
    assert probe.get_params()["alpha"] == 1e-3
    assert clone(probe).set_params(alpha=0.1).alpha == 0.1
    with pytest.raises(NotFittedError):
        probe.predict(np.zeros((2, 3), np.float32))
    X, y = blobs(n=500, c=4, k=3)
    assert probe.fit(X, y) is probe
    assert probe.classes_.tolist() == [0, 1, 2] and probe.n_features_in_ == 4
    from sklearn.model_selection import cross_val_score

    assert cross_val_score(PixelProbe(1e-3, device="cpu"), X, y, cv=2).mean() > 0.5


def test_class_absent_from_training_is_never_predicted():
    X, y = blobs(n=600, c=4, k=3)
    probe = PixelProbe(1e-3, num_classes=5, device="cpu").fit(X, y)
    assert probe.coef_.shape == (5, 4)
    assert set(np.unique(probe.predict(X))) <= {0, 1, 2}


def test_evaluation_beyond_the_inferred_classes_says_to_pass_num_classes():
    X, y = blobs(n=300, c=4, k=3)
    probe = PixelProbe(1e-3, device="cpu").fit(X, y)  # 3 classes inferred
    y_val = y.copy()
    y_val[0] = 4
    match = r"among the 3 classes the probe inferred .* got class 4\. Fix: pass num_classes="
    with pytest.raises(ConfigError, match=match):
        probe.evaluate(X, y_val)
    images = np.zeros((2, 4, 4, 4), np.float32), np.zeros((2, 8, 8), np.uint8)
    probe = PixelProbe(1e-3, device="cpu").fit(images[0], images[1] + np.eye(8, dtype=np.uint8))
    with pytest.raises(ConfigError, match="inferred from its training labels"):
        probe.evaluate(images[0], images[1] + 2)
    assert probe.evaluate(images[0], np.full((2, 8, 8), 255, np.uint8)).counts.sum() == 0


@pytest.mark.parametrize("X,y,match", [
    (np.zeros((4, 3)), np.zeros((5,)), "X and y must"),
    (np.zeros((2, 3, 4, 4)), np.zeros((2, 8)), "X and y must"),
    (np.zeros((4, 3)), np.full(4, 255), "non-ignored"),
])
def test_bad_inputs_are_one_line_errors(X, y, match):
    with pytest.raises(ConfigError, match=match):
        PixelProbe(1e-3, device="cpu").fit(X, y)


def test_bad_labels_and_params():
    X, y = blobs(n=50, c=3, k=3)
    with pytest.raises(ConfigError, match="num_classes"):
        PixelProbe(1e-3, num_classes=2, device="cpu").fit(X, y)
    with pytest.raises(ConfigError, match="class_weight"):
        PixelProbe(class_weight="auto").fit(X, y)


# ---- caches ----------------------------------------------------------------------------------
def test_fit_streams_over_a_cache_like_in_memory_arrays(caches):
    train = caches["train"]
    lazy = PixelProbe(1e-3, device="cpu", batch_size=5).fit(train["layer1.0"], train.labels)
    eager = PixelProbe(1e-3, device="cpu").fit(np.asarray(train["layer1.0"]),
                                               np.asarray(train.labels))
    np.testing.assert_allclose(lazy.coef_, eager.coef_, atol=1e-6)


def test_probe_points_scores_every_point(caches):
    train, val = caches["train"], caches["val"]
    result = probe_points(train, val, "all", alpha=1e-3, null=True, device="cpu",
                          progress=False)
    rows = result.rows()
    assert [r["point"] for r in rows] == train.point_names
    assert list(rows[0])[:3] == ["point", "stride", "channels"]
    # independent check of one point: fit directly, confusion matrix by hand
    name = "layer1.1"
    probe = PixelProbe(1e-3, num_classes=len(train.classes), device="cpu").fit(
        train[name], train.labels)
    logits = torch.from_numpy(probe.decision_function(val[name], size=val.input_size))
    cm = ConfusionMatrix(len(train.classes)).update(logits.argmax(1), np.asarray(val.labels)
                                                   .astype(np.int64))
    row = rows[train.point_names.index(name)]
    assert row["miou"] == pytest.approx(cm.miou())
    assert row["pixel_accuracy"] == pytest.approx(cm.pixel_accuracy())
    assert row["mean_accuracy"] == pytest.approx(cm.mean_accuracy())
    assert row["iou_background"] == pytest.approx(cm.iou()[0])
    assert all(0 <= r["null_pixel_accuracy"] <= 1 for r in rows)
    assert result.train["ids_sha256"] == train.ids_sha256
    assert result.versions["torch"] == str(torch.__version__) and result.seed == 0


def test_result_round_trip_and_no_overwrite(caches, tmp_path):
    result = probe_points(caches["train"], caches["val"], "stages", alpha=1e-3, device="cpu",
                          progress=False)
    js, cs = write_result(result, tmp_path / "probe")
    assert read_result(js) == result
    assert cs.read_text().splitlines()[0].startswith("point,stride,channels,pixel_accuracy")
    with pytest.raises(ConfigError, match="overwrite"):
        write_result(result, tmp_path / "probe.json")
    write_result(result, tmp_path / "probe.json", force=True)
    d = json.loads(js.read_text())
    d["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        ProbeResult.from_dict(d)
    assert all(r["miou"] is None or not math.isnan(r["miou"]) for r in result.rows())


@pytest.fixture(scope="module")
def random_caches(tmp_path_factory):
    """The same samples through the same architecture with other random weights."""
    root = tmp_path_factory.mktemp("probe_random")
    spec = dataclasses.replace(SPEC, seed=5)
    for split, n in (("train", 12), ("val", 8)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(seed=5), ds, "stages", root / f"{split}.h5", spec=spec,
                        batch_size=8, dtype="float32", num_workers=0, progress=False)
    return featlab.open_cache(root / "train.h5"), featlab.open_cache(root / "val.h5")


def test_random_backbone_baseline_is_the_probe_on_the_random_caches(caches, random_caches):
    rtrain, rval = random_caches
    result = probe_points(caches["train"], caches["val"], "stages", alpha=1e-3, device="cpu",
                          random_caches=random_caches, progress=False)
    for row in result.rows():
        direct = PixelProbe(1e-3, num_classes=len(rtrain.classes), device="cpu").fit(
            rtrain[row["point"]], rtrain.labels).evaluate(rval[row["point"]], rval.labels)
        assert row["random_miou"] == pytest.approx(direct.miou())
        assert row["random_pixel_accuracy"] == pytest.approx(direct.pixel_accuracy())
        assert row["random_miou"] != pytest.approx(row["miou"])  # other features, other score
        assert "null_miou" not in row
    assert result.settings["random"] is True and result.random_train == rtrain.identity()
    assert result.random_train["model_state"] != result.train["model_state"]
    assert ProbeResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result
    plain = probe_points(caches["train"], caches["val"], "stages", alpha=1e-3, device="cpu",
                         progress=False)
    assert "random_miou" not in plain.rows()[0] and plain.random_train == {}


def test_random_backbone_caches_are_checked(caches, random_caches):
    train, val = caches["train"], caches["val"]
    rtrain, rval = random_caches
    with pytest.raises(CacheError, match="other weights"):
        probe_points(train, val, "stages", random_caches=(train, val), progress=False)
    with pytest.raises(CacheError, match="same samples"):
        probe_points(train, val, "stages", random_caches=(rval, rval), progress=False)
    with pytest.raises(CacheError, match="lacks"):  # random caches hold only the stages
        probe_points(train, val, "all", random_caches=(rtrain, rval), progress=False)


def test_a_trained_random_baseline_is_warned(caches, tmp_path):
    """Other weights that are not a random init (say another checkpoint) still make a baseline,
    but not the one the README's null recipe means."""
    spec = dataclasses.replace(SPEC, weights="imagenet")
    for split, n in (("train", 12), ("val", 8)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(seed=5), ds, "stages", tmp_path / f"{split}.h5", spec=spec,
                        batch_size=8, dtype="float32", num_workers=0, progress=False)
    with pytest.warns(FeatlabWarning, match="random initialisation; its caches hold weights "
                                            "'imagenet'. Fix: .*--weights none"):
        probe_points(caches["train"], caches["val"], "stages", alpha=1e-3, device="cpu",
                     random_caches=(tmp_path / "train.h5", tmp_path / "val.h5"),
                     progress=False)


def test_probe_points_refuses_mismatched_caches(caches, tmp_path):
    other = tmp_path / "other.h5"
    ds = featlab.load_dataset("shapes", split="val", size=32, length=2)
    featlab.extract(ft.TinyResNet(seed=3), ds, "stages", other,
                    spec=BackboneSpec("tiny2", "none", (0.5,) * 3, (0.25,) * 3, 32, 10),
                    dtype="float32", num_workers=0, progress=False)
    with pytest.raises(CacheError, match="share the model's name; got 'tiny' in .* and 'tiny2' "
                                         "in"):  # the field that differs, not two whole records
        probe_points(caches["train"], other, progress=False)
    # the same backbone, other channels of a point: the probe would be scored on other features
    ds = featlab.load_dataset("shapes", split="val", size=32, length=8)
    for name, seed in (("some.h5", 0), ("others.h5", 1)):
        featlab.extract(ft.TinyResNet(), ds, "all", tmp_path / name, spec=SPEC, max_channels=8,
                        channel_seed=seed, dtype="float32", num_workers=0, progress=False)
    with pytest.raises(CacheError, match="point 'layer1.1' as the train cache does"):
        probe_points(caches["train"], tmp_path / "some.h5", progress=False)
    with pytest.raises(CacheError, match="--max-channels and --channel-seed"):
        probe_points(tmp_path / "some.h5", tmp_path / "others.h5", progress=False)
    # the same subset on both sides is fine, and the probe reports the channels it saw
    with pytest.warns(FeatlabWarning, match="must be held out; the train and val caches hold "
                                            "the same samples"):  # one cache on both sides
        rows = probe_points(tmp_path / "some.h5", tmp_path / "some.h5", ["layer1.1"],
                            alpha=1e-3, device="cpu", progress=False).rows()
    assert rows[0]["channels"] == 8


@pytest.mark.parametrize("h,max_pixels", [(2, None), (8, 40)])  # cells < pixels; > pixels
def test_fit_uses_exactly_the_sampled_pixels(h, max_pixels):
    from featlab.analysis._pixels import sample_pixels

    rng = np.random.default_rng(1)
    feats = rng.normal(size=(5, 3, h, h)).astype(np.float32)
    labels = rng.integers(0, 3, size=(5, 8, 8)).astype(np.uint8)
    kw = dict(max_pixels=max_pixels, seed=4)
    img = PixelProbe(1e-3, device="cpu", dtype="float64", tol=1e-7, **kw).fit(feats, labels)
    s = sample_pixels(feats, labels, ignore_index=255, batch_size=16, **kw)
    assert (len(s.cells) < len(s.y)) == (max_pixels is None)
    pix = PixelProbe(1e-3, device="cpu", dtype="float64", tol=1e-7, max_pixels=None).fit(
        s.X, s.y)
    np.testing.assert_allclose(img.coef_, pix.coef_, atol=1e-4)
    np.testing.assert_allclose(s.X.mean(0), s.mean, atol=1e-5)
    np.testing.assert_allclose(s.X.var(0), s.var, atol=1e-5)


@pytest.mark.parametrize("max_pixels", [None, 200])  # dense grid; sparse interpolation
@pytest.mark.parametrize("plain", [False, True])     # image data; plain pixel rows
def test_chunked_data_term_is_the_whole_one(monkeypatch, max_pixels, plain):
    import featlab.analysis._logreg as logreg

    rng = np.random.default_rng(7)
    feats = rng.normal(size=(6, 4, 3, 3))
    labels = rng.integers(0, 3, size=(6, 9, 9)).astype(np.uint8)
    labels[2, :4] = 255
    if plain:
        feats, labels = rng.normal(size=(300, 4)), rng.integers(0, 3, 300)
    kw = dict(device="cpu", dtype="float64", tol=1e-9, max_pixels=max_pixels,
              class_weight="balanced")
    whole = PixelProbe(1e-3, **kw).fit(feats, labels)
    monkeypatch.setattr(logreg, "_CHUNK", 20)  # one image / a few pixels per chunk
    chunked = PixelProbe(1e-3, **kw).fit(feats, labels)
    np.testing.assert_allclose(chunked.coef_, whole.coef_, atol=1e-8)
    np.testing.assert_allclose(chunked.intercept_, whole.intercept_, atol=1e-8)


def test_a_dense_probe_that_would_not_fit_in_memory_is_refused_before_reading(caches,
                                                                              monkeypatch):
    from featlab import allocator
    from featlab.analysis._pixels import DENSE_MEMORY_FACTOR

    train = caches["train"]
    c, h, w = train["layer1.1"].shape[1:]
    need = DENSE_MEMORY_FACTOR * 12 * c * h * w * 4 + 12 * 32 * 32 * 8  # 12 labelled images
    monkeypatch.setattr(allocator, "available_memory", lambda: need - 1)
    probe = PixelProbe(1e-3, num_classes=len(train.classes), device="cpu", max_pixels=None)
    with pytest.raises(ConfigError, match=r"every labelled pixel must fit in memory; 12 images "
                                          r"of .* Fix: sample pixels \(--max-pixels N"):
        probe.fit(train["layer1.1"], train.labels)
    monkeypatch.setattr(allocator, "available_memory", lambda: need)
    probe.fit(train["layer1.1"], train.labels)
    monkeypatch.setattr(allocator, "available_memory", lambda: 1)
    PixelProbe(1e-3, num_classes=len(train.classes), device="cpu", max_pixels=500).fit(
        train["layer1.1"], train.labels)  # sampled: memory bounded by the sample, no check
