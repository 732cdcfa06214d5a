"""Resolution table: published receptive-field arithmetic, ERF, resolution ceiling (R-12)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

import featlab
import featlab.testing as ft
from featlab.analysis import resolution as res
from featlab.errors import ConfigError
from featlab.models import BackboneSpec
from featlab.receptive_field import gradient_receptive_field

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


def closed_form(layers):
    """Araujo et al. (Distill 2019) eq. for a chain of (kernel, stride, padding):
    r = 1 + sum_l (k_l - 1) prod_{i<l} s_i, S = prod s_l, P = sum_l p_l prod_{i<l} s_i."""
    r, jump, pad = 1, 1, 0
    for k, s, p in layers:
        r += (k - 1) * jump
        pad += p * jump
        jump *= s
    return r, jump, pad


def resnet18_chain(upto):
    """The longest path of torchvision resnet18 up to the end of a stage (3x3 convs)."""
    chain = [(7, 2, 3), (3, 2, 1)]                       # conv1, maxpool
    for stage in range(1, upto + 1):
        chain += [(3, 1 if stage == 1 else 2, 1)] + [(3, 1, 1)] * 3
    return chain


@pytest.fixture(scope="module")
def resnet18_table():
    model, _ = featlab.get_backbone("resnet18", weights="none")
    return model, {r["point"]: r for r in res.resolution_table(model, input_size=224).rows()}


def test_resnet18_geometry_matches_published_arithmetic(resnet18_table):
    _, rows = resnet18_table
    for stage, stride, size in ((1, 4, 56), (2, 8, 28), (3, 16, 14), (4, 32, 7)):
        r, jump, pad = closed_form(resnet18_chain(stage))
        row = rows[f"layer{stage}.1"]
        assert (row["rf_size"], row["rf_stride"], row["rf_padding"]) == (r, jump, pad)
        assert (row["stride"], row["size"], row["width"]) == (stride, size, size)
    assert rows["layer4.1"]["rf_size"] == 435 and rows["conv1"]["rf_size"] == 7
    assert list(rows["conv1"])[:6] == ["point", "index", "channels", "size", "width", "stride"]


def test_sizes_follow_the_input_size_and_fields_do_not(resnet18_table):
    model, rows224 = resnet18_table
    rows = {r["point"]: r for r in res.resolution_table(model, input_size=(64, 96)).rows()}
    assert (rows["layer4.1"]["size"], rows["layer4.1"]["width"]) == (2, 3)
    assert (rows["layer2.0"]["size"], rows["layer2.0"]["width"]) == (8, 12)
    assert all(rows[k]["rf_size"] == rows224[k]["rf_size"] for k in rows)


def test_theory_matches_the_gradient_support_on_a_linearised_copy():
    net = ft.TinyResNet()
    for row in res.resolution_table(net, input_size=64).rows():
        emp = gradient_receptive_field(net, row["point"], 64, unit=(5, 5))
        start = 5 * row["rf_stride"] - row["rf_padding"]
        assert emp.start[0] == max(0, start)
        assert emp.stop[0] == min(63, start + row["rf_size"] - 1)


class Box(nn.Module):
    """One 3x3 all-ones convolution on a 1-channel input: the centre unit's input gradient is
    1 on its 3x3 window and 0 elsewhere."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
        nn.init.ones_(self.conv.weight)

    def forward(self, x):
        return self.conv(x)


def test_erf_of_a_box_filter_is_hand_computed():
    net = Box()
    point = featlab.SkipPoint("conv", 0, "conv", 1, (9, 9), 1, 3, 1, 1)
    erf = res.effective_receptive_fields(net, torch.randn(3, 1, 9, 9), [point])["conv"]
    expected = np.zeros((9, 9))
    expected[3:6, 3:6] = 1 / 9
    np.testing.assert_allclose(erf.map, expected, atol=1e-12)
    assert erf.unit == (4, 4) and erf.centre == (4.0, 4.0) and erf.num_images == 3
    # discs around the centre: radius 0 holds 1/9, radius 1 holds 5/9, radius sqrt(2) all
    assert erf.radius50 == 1.0 and erf.radius90 == pytest.approx(np.sqrt(2))
    assert not net.conv._forward_hooks and not net._forward_hooks and not net._forward_pre_hooks


def test_erf_lies_inside_the_theoretical_field_and_leaves_the_model_alone():
    net = ft.TinyResNet().train()
    points = featlab.skip_points(net, 32)
    erf = res.effective_receptive_fields(net, [ft.random_images(2, 32, seed=s) for s in (0, 1)],
                                         points)
    assert net.training and all(not m._forward_hooks for m in net.modules())
    for p in points:
        e = erf[p.name]
        assert e.num_images == 4 and e.map.sum() == pytest.approx(1.0)
        lo = e.unit[0] * p.rf_stride - p.rf_padding
        rows = np.flatnonzero(e.map.sum(1) > 0)
        assert rows.min() >= max(0, lo) and rows.max() <= lo + p.rf_size - 1
        assert 0 <= e.radius50 <= e.radius90 <= p.rf_size
    assert erf["layer1.1"].radius90 > erf["conv1"].radius90


def test_erf_of_many_images_runs_a_few_at_a_time():
    """One tensor of images is run ERF_BATCH at a time (memory for the backward does not grow
    with their number) and averages to what the whole batch gives."""
    net = ft.TinyResNet()
    points = featlab.skip_points(net, 32, select="stages")
    images = ft.random_images(2 * res.ERF_BATCH + 3, 32)
    sizes = []
    net.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])))
    erf = res.effective_receptive_fields(net, images, points)
    assert sizes == [res.ERF_BATCH, res.ERF_BATCH, 3]
    whole = res.effective_receptive_fields(net, [images], points)
    for p in points:
        assert erf[p.name].num_images == len(images)
        np.testing.assert_allclose(erf[p.name].map, whole[p.name].map, rtol=1e-5, atol=1e-9)


def reference_ceiling(labels, grid, num_classes, ignore=255):
    """Majority per cell with explicit loops; IoU per class from explicit counts."""
    n, hh, ww = labels.shape
    h, w = grid
    tp = np.zeros(num_classes)
    fp = np.zeros(num_classes)
    fn = np.zeros(num_classes)
    for i in range(n):
        pred = np.full((hh, ww), ignore)
        for u in range(h):
            for v in range(w):
                r0, r1 = (u * hh) // h, ((u + 1) * hh) // h
                c0, c1 = (v * ww) // w, ((v + 1) * ww) // w
                block = labels[i, r0:r1, c0:c1]
                block = block[block != ignore]
                if block.size:
                    counts = np.bincount(block, minlength=num_classes)
                    pred[r0:r1, c0:c1] = counts.argmax()
        keep = labels[i] != ignore
        for c in range(num_classes):
            tp[c] += ((pred == c) & (labels[i] == c) & keep).sum()
            fp[c] += ((pred == c) & (labels[i] != c) & keep).sum()
            fn[c] += ((pred != c) & (labels[i] == c) & keep).sum()
    union = tp + fp + fn
    return float(np.mean(tp[union > 0] / union[union > 0]))


def test_ceiling_matches_an_explicit_computation():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.repeat(rng.integers(0, 4, (5, 6, 6)), 4, 1), 4, 2)   # 24 x 24
    labels[:, :, :2] = 255
    labels[rng.random(labels.shape) < 0.1] = 3
    labels = labels.astype(np.uint8)
    out = res.resolution_ceiling([labels[:2], labels[2:]], [(24, 24), (6, 6), (4, 4), (5, 7)], 4)
    for grid in [(6, 6), (4, 4), (5, 7)]:
        assert out[grid]["majority"]["miou"] == pytest.approx(
            reference_ceiling(labels, grid, 4), abs=1e-12)
    assert out[(24, 24)]["nearest"]["miou"] == out[(24, 24)]["majority"]["miou"] == 1.0
    assert out[(6, 6)]["majority"]["miou"] > out[(4, 4)]["majority"]["miou"]
    with pytest.raises(ConfigError, match="class indices"):
        res.resolution_ceiling(labels, [(4, 4)], 3)
    with pytest.raises(ConfigError, match="modes"):
        res.resolution_ceiling(labels, [(4, 4)], 4, modes=["bilinear"])


def test_nearest_falls_back_to_the_majority_when_the_centre_is_ignored():
    lab = np.full((1, 4, 4), 1, np.uint8)
    lab[0, 2, 2] = 255     # the centre pixel of the only cell
    lab[0, 0, 0] = 0
    assert res.reduce_labels(lab, (1, 1), 2, "nearest").tolist() == [[[1]]]
    lab[0, 2, 2] = 0
    assert res.reduce_labels(lab, (1, 1), 2, "nearest").tolist() == [[[0]]]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("res") / "c.h5"
    ds = featlab.load_dataset("shapes", split="val", size=32, length=16)
    featlab.extract(ft.TinyResNet(), ds, "all", path, spec=SPEC, batch_size=8, dtype="float16",
                    num_workers=0, progress=False)
    return featlab.open_cache(path)


def test_table_from_a_cache(cache, tmp_path):
    table = res.resolution_table(cache, progress=False)
    rows = {r["point"]: r for r in table.rows()}
    assert list(rows) == cache.point_names and table.num_images == 16
    assert table.num_classes == len(cache.classes)
    labels = cache.labels[:]
    for name in ("conv1", "layer1.1"):
        p = cache.point(name)
        assert rows[name]["ceiling_miou"] == pytest.approx(
            reference_ceiling(labels, p.size, len(cache.classes)), abs=1e-12)
    assert rows["conv1"]["ceiling_miou"] == rows["relu"]["ceiling_miou"]      # same grid
    assert rows["layer1.1"]["ceiling_miou"] < rows["conv1"]["ceiling_miou"] <= 1.0
    assert rows["layer1.1"]["ceiling_miou_nearest"] <= 1.0
    assert table.cache["ids_sha256"] == cache.ids_sha256
    paths = res.write_result(table, tmp_path / "t")
    again = res.ResolutionResult.from_dict(json.loads(paths[0].read_text()))
    assert again.rows() == table.rows()
    header = paths[1].read_text().splitlines()[0].split(",")
    assert header[:3] == ["point", "index", "channels"] and "ceiling_miou" in header
    with pytest.raises(ConfigError, match="--force"):
        res.write_result(table, tmp_path / "t")


def test_a_pooled_point_has_the_ceiling_of_the_grid_the_cache_stores(tmp_path):
    # a probe of a --max-size cache sees the pooled grid: its ceiling is that grid's
    ds = featlab.load_dataset("shapes", split="val", size=32, length=8)
    pooled = featlab.extract(ft.TinyResNet(), ds, "all", tmp_path / "p.h5", spec=SPEC,
                             max_size=4, num_workers=0, progress=False)
    cache = featlab.open_cache(pooled.path)
    table = res.resolution_table(cache, progress=False)
    rows = {r["point"]: r for r in table.rows()}
    labels, classes = cache.labels[:], len(cache.classes)
    assert (rows["conv1"]["size"], rows["conv1"]["stored_size"]) == (16, 4)
    assert rows["conv1"]["ceiling_miou_majority"] == pytest.approx(
        reference_ceiling(labels, (4, 4), classes), abs=1e-12)
    assert table.stored == {n: [4, 4] for n in cache.point_names
                            if tuple(cache.point(n).size) != (4, 4)}
    again = res.ResolutionResult.from_dict(table.to_dict())
    assert again.rows() == table.rows()
    old = {k: v for k, v in table.to_dict().items() if k != "stored"}  # before it existed
    assert res.ResolutionResult.from_dict(old).stored == {}


def test_table_with_erf_and_errors():
    net = ft.TinyResNet()
    points = featlab.skip_points(net, 32, select="stages")
    table = res.resolution_table(points, model=net, images=ft.random_images(2, 32),
                                 device="cpu", progress=False)
    row = table.rows()[-1]
    assert row["erf_radius50"] <= row["erf_radius90"] and "ceiling_miou" not in row
    assert table.to_dict()["erf"]["layer1.1"]["map"][0][0] >= 0
    with pytest.raises(ConfigError, match="model"):
        res.resolution_table(points, images=ft.random_images(1, 32))
    with pytest.raises(ConfigError, match="source must be"):
        res.resolution_table(42)
