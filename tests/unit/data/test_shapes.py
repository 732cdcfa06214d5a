"""The embedded ``shapes`` data set: determinism, content statistics, geometry, options."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score

from featlab.data import load_dataset, render_scene
from featlab.data.shapes import CLASSES, ShapeObject, ShapesDataset, largest_visible_class
from featlab.errors import ConfigError, UnknownNameError


def scenes(n, size=64, seed=0, **kw):
    return [render_scene(np.random.default_rng([seed, i]), size, **kw) for i in range(n)]


@functools.lru_cache(maxsize=None)
def single_objects(size):
    """Scenes with one object each, rendered once for all the geometry tests."""
    return scenes(300, size=size, seed=5, num_objects=1)


def test_classes_are_background_plus_eight_shapes():
    assert CLASSES == ("background", "circle", "square", "triangle", "star", "cross", "ring",
                       "hexagon", "arrow")
    ds = load_dataset("shapes", "val", length=1)
    assert ds.classes == CLASSES and ds.num_classes == 9 and ds.ignore_index == 255


def test_sample_protocol_and_types():
    ds = load_dataset("shapes", "train", size=48, length=5)
    s = ds[4]
    assert set(s) == {"image", "mask", "id", "index"}
    assert s["image"].dtype == torch.float32 and s["image"].shape == (3, 48, 48)
    assert s["image"].is_contiguous() and 0.0 <= s["image"].min() and s["image"].max() <= 1.0
    assert s["mask"].dtype == torch.uint8 and s["mask"].shape == (48, 48)
    assert s["id"] == "train/s0/000004" and s["index"] == 4
    assert ds.ids == sorted(ds.ids) and len(ds) == 5
    # the float image is the uint8 rendering / 255, exactly
    image, mask, _ = ds.scene(4)
    assert torch.equal(s["image"], torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255.0)
    assert torch.equal(s["mask"], torch.from_numpy(mask))
    assert torch.equal(ds[-1]["mask"], s["mask"])
    with pytest.raises(IndexError):
        ds[5]


def test_default_lengths_and_size():
    assert [len(load_dataset("shapes", s)) for s in ("train", "val", "test")] == [2000, 500, 500]
    assert load_dataset("shapes", "val").size == 128
    assert load_dataset("shapes", "val").settings()["size"] == 128


def test_deterministic_per_seed_split_index_across_instances_and_order():
    a = ShapesDataset("val", size=64, length=10)
    b = ShapesDataset("val", size=64, length=10)
    forward = [a[i] for i in range(10)]
    backward = [b[i] for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
    # the documented recipe: default_rng([seed, split_code, index]) with val = 1
    image, mask, _ = render_scene(np.random.default_rng([0, 1, 7]), 64)
    assert np.array_equal(mask, forward[7]["mask"].numpy())
    assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1) / 255.0,
                       forward[7]["image"])


def test_splits_and_seeds_are_different_streams():
    masks = {}
    for split in ("train", "val", "test"):
        for seed in (0, 1):
            ds = ShapesDataset(split, size=32, seed=seed, length=4)
            masks[split, seed] = np.stack([ds[i]["mask"].numpy() for i in range(4)])
    keys = list(masks)
    for i, k1 in enumerate(keys):
        for k2 in keys[i + 1:]:
            # no image of one stream equals any image of another
            same = [(m1 == m2).all() for m1 in masks[k1] for m2 in masks[k2]]
            assert not any(same), (k1, k2)


def test_every_class_appears_and_several_objects_per_image():
    rendered = scenes(40)
    seen = set()
    for _, mask, _ in rendered:
        seen |= set(np.unique(mask).tolist())
    assert seen == set(range(9))
    counts = [len(objs) for _, _, objs in rendered]
    visible = [sum(o.visible_area > 0 for o in objs) for _, _, objs in rendered]
    assert min(counts) >= 2 and max(counts) <= 5
    assert np.mean(counts) >= 3.0 and np.mean(visible) >= 3.0  # 2..5 uniform: 3.5 expected


def test_object_records_agree_with_the_mask():
    for image, mask, objs in scenes(30, size=80):
        assert image.shape == (80, 80, 3) and image.dtype == np.uint8
        for cls in range(1, 9):
            expected = sum(o.visible_area for o in objs if o.class_index == cls)
            assert int((mask == cls).sum()) == expected
        for o in objs:
            assert o.class_name == CLASSES[o.class_index]
            assert 0 <= o.visible_area <= o.area
            # the circle of diameter `size` around the centre (stretched by the aspect) is inside
            r = o.size / 2
            assert all(r - 1e-6 <= c <= 80 - r + 1e-6 for c in o.centre)


def test_largest_visible_class_is_the_biggest_region_of_the_mask():
    checked = 0
    for _, mask, objs in scenes(40):
        classes = [o.class_index for o in objs]
        if len(set(classes)) < len(classes):
            continue  # two objects of one class share a label: the mask cannot tell them apart
        counts = np.bincount(mask.ravel(), minlength=9)
        assert largest_visible_class(objs) == int(counts[1:].argmax()) + 1
        checked += 1
    assert checked >= 15


def test_sizes_span_small_to_large_and_occlusion_happens():
    objs = [o for _, _, os_ in scenes(60, size=100) for o in os_]
    sizes = np.array([o.size for o in objs]) / 100
    assert sizes.min() >= 0.1 - 1e-9 and sizes.max() <= 0.6 + 1e-9
    assert sizes.min() < 0.13 and sizes.max() > 0.5
    assert any(0 < o.visible_area < o.area for o in objs)
    assert any(o.aspect != 1.0 for o in objs)
    assert all(o.aspect == 1.0 for o in objs if o.class_name in ("circle", "square", "ring"))
    angles = np.array([o.angle for o in objs])
    assert angles.min() >= 0 and angles.max() < 2 * math.pi and np.ptp(angles) > 5.0


def test_num_objects_option():
    assert all(len(o) == 1 for _, _, o in scenes(10, num_objects=1))
    assert all(len(o) == 4 for _, _, o in scenes(10, num_objects=(4, 4)))
    ds = load_dataset("shapes", "train", size=32, length=5, num_objects=(1, 2))
    assert all(1 <= len(ds.scene(i)[2]) <= 2 for i in range(5))
    for bad in (0, (3, 2), "many", (1, 300)):
        with pytest.raises(ConfigError, match="num_objects"):
            render_scene(np.random.default_rng(0), 32, num_objects=bad)


@pytest.mark.parametrize("shape,area", [
    ("circle", lambda r: math.pi * r * r),
    ("square", lambda r: 2 * r * r),                        # side r * sqrt(2)
    ("triangle", lambda r: 3 * math.sqrt(3) / 4 * r * r),   # equilateral, circumradius r
    ("hexagon", lambda r: 3 * math.sqrt(3) / 2 * r * r),    # regular, circumradius r
])
def test_rendered_area_matches_the_analytic_area(shape, area):
    checked = 0
    for _, mask, (o,) in single_objects(128):
        if o.class_name != shape:
            continue
        r = o.size / 2
        # pixel-centre sampling errs only along the edge: bound by a fraction of the perimeter
        assert abs(o.area - area(r)) <= 0.15 * 2 * math.pi * r + 2, (o, area(r))
        assert int((mask == o.class_index).sum()) == o.area  # a lone object is fully visible
        checked += 1
    assert checked >= 15


@pytest.mark.parametrize("shape", ["circle", "square"])
def test_mask_equals_an_independent_float64_rasterisation(shape):
    checked = 0
    for _, mask, (o,) in single_objects(128):
        if o.class_name != shape:
            continue
        y, x = np.mgrid[0:128, 0:128] + 0.5
        y, x = y - o.centre[0], x - o.centre[1]
        r = o.size / 2
        if shape == "circle":
            inside = x * x + y * y < r * r
        else:
            u = x * math.cos(o.angle) + y * math.sin(o.angle)
            v = -x * math.sin(o.angle) + y * math.cos(o.angle)
            inside = np.maximum(abs(u), abs(v)) < r / math.sqrt(2)
        # float32 vs float64 may disagree only for centres within ~1e-4 px of the edge
        assert np.count_nonzero(inside != (mask == o.class_index)) <= 2
        checked += 1
    assert checked >= 15


def test_colour_and_texture_carry_no_class_information():
    feats, labels, background = [], [], []
    for image, mask, _ in scenes(350, size=48, seed=11):
        image = image.astype(np.float64) / 255
        for cls in np.unique(mask):
            mean = image[mask == cls].mean(axis=0)
            if cls == 0:
                background.append(mean)
            else:
                feats.append(mean)
                labels.append(cls)
    feats, labels = np.array(feats), np.array(labels)
    assert len(labels) >= 900
    bg = np.mean(background, axis=0)
    for cls in range(1, 9):
        class_mean = feats[labels == cls].mean(axis=0)
        assert np.linalg.norm(class_mean - bg) < 0.1, (CLASSES[cls], class_mean, bg)
    # a classifier that sees only an object's mean colour does no better than chance (1/8)
    accuracy = cross_val_score(LogisticRegression(max_iter=500), feats, labels, cv=5).mean()
    assert accuracy < 0.2


def test_same_scene_at_every_size():
    small = ShapesDataset("train", size=64, length=6)
    large = ShapesDataset("train", size=256, length=6)
    for i in range(6):
        _, m64, o64 = small.scene(i)
        _, m256, o256 = large.scene(i)
        assert m64.shape == (64, 64) and m256.shape == (256, 256)
        assert [o.class_index for o in o64] == [o.class_index for o in o256]
        assert [o.size * 4 for o in o64] == pytest.approx([o.size for o in o256])
        assert [o.angle for o in o64] == [o.angle for o in o256]
        # pixel centres of the 64 grid fall between 256-pixels 4i+1 and 4i+2: agree off edges
        assert np.mean(m256[1::4, 1::4] == m64) > 0.95


def test_antialias_changes_only_the_image():
    # one object per image, so that every object edge is a mask edge
    a = ShapesDataset("val", size=64, length=3, antialias=True, num_objects=1)
    b = ShapesDataset("val", size=64, length=3, antialias=False, num_objects=1)
    for i in range(3):
        ia, ma, _ = a.scene(i)
        ib, mb, _ = b.scene(i)
        assert np.array_equal(ma, mb)
        differ = (ia != ib).any(axis=-1)
        assert differ.any()
        # anti-aliasing touches only pixels next to an object edge
        edge = np.zeros_like(differ)
        edge[:-1] |= ma[:-1] != ma[1:]
        edge[1:] |= ma[:-1] != ma[1:]
        edge[:, :-1] |= ma[:, :-1] != ma[:, 1:]
        edge[:, 1:] |= ma[:, :-1] != ma[:, 1:]
        grown = edge.copy()
        grown[1:] |= edge[:-1]
        grown[:-1] |= edge[1:]
        grown[:, 1:] |= edge[:, :-1]
        grown[:, :-1] |= edge[:, 1:]
        assert not (differ & ~grown).any()


def test_settings_rebuild_and_validation():
    ds = load_dataset("shapes", "test", size=40, seed=3, length=7, num_objects=(1, 3))
    settings = ds.settings()
    assert settings["generator"] == "shapes-v1" and settings["num_objects"] == [1, 3]
    again = load_dataset(**settings)
    assert again.ids == ds.ids and torch.equal(again[6]["image"], ds[6]["image"])
    with pytest.raises(ConfigError, match="generator"):
        load_dataset(**{**settings, "generator": "shapes-v0"})
    with pytest.raises(ConfigError, match="root"):
        load_dataset("shapes", "val", root="/data")
    with pytest.raises(UnknownNameError, match="Did you mean 'val'"):
        load_dataset("shapes", "vall")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="size"):
            load_dataset("shapes", "val", size=bad)
    with pytest.raises(ConfigError, match="length"):
        load_dataset("shapes", "val", length=-1)
    for bad in (-1, None, 1.5):
        with pytest.raises(ConfigError, match="seed"):
            load_dataset("shapes", "val", seed=bad)
    with pytest.raises(ConfigError, match="size"):
        render_scene(np.random.default_rng(0), 0)


def test_shape_object_round_trip():
    _, _, objs = render_scene(np.random.default_rng(3), 32)
    d = objs[0].to_dict()
    assert isinstance(d["centre"], list) and ShapeObject.from_dict(d) == objs[0]
    with pytest.raises(ConfigError, match="unknown"):
        ShapeObject.from_dict({**d, "colour": 1})
