"""Heads: the single-skip head starts as the baseline; a frozen backbone stays frozen (R-8.1)."""

from __future__ import annotations

import copy

import pytest
import torch

import featlab
import featlab.testing as ft
from featlab.errors import ConfigError
from featlab.segment.heads import FrozenBackbone, SegHead, upsample
from featlab.segment.sources import ImageSource
from featlab.segment.train import HeadSettings, _Joint, _optimizer, fit

from .conftest import SPEC


def feats(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"last": torch.randn(3, 16, 2, 2, generator=g) * 5 + 1,
            "mid": torch.randn(3, 8, 8, 8, generator=g)}


@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_single_skip_head_starts_exactly_as_the_baseline_and_then_departs(fusion):
    torch.manual_seed(0)
    base = SegHead("last", 16, 4)
    torch.manual_seed(0)
    skip = SegHead("last", 16, 4, skip="mid", skip_channels=8, fusion=fusion)
    # same seed -> same classifier init: the pair is compared from one starting point
    assert torch.equal(base.classifier.weight, skip.classifier.weight)
    x = feats()
    assert torch.equal(skip(x, (32, 32)), base(x, (32, 32)))
    # the zero branch still learns: one step moves the output away from the baseline's
    opt = torch.optim.SGD(skip.parameters(), lr=0.5)
    target = torch.randint(0, 4, (3, 32, 32), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(skip(x, (32, 32)), target).backward()
        opt.step()
    last_layer = skip.branch if fusion == "sum" else skip.branch[2]
    assert last_layer.weight.abs().sum() > 0


def test_baseline_is_the_last_features_classified_then_upsampled_bilinearly():
    head = SegHead("last", 16, 4)
    x = feats()
    expected = torch.nn.functional.interpolate(
        torch.nn.functional.conv2d(x["last"], head.classifier.weight, head.classifier.bias),
        size=(32, 32), mode="bilinear", align_corners=False)
    torch.testing.assert_close(head(x, (32, 32)), expected)
    assert head(x, (7, 9)).shape == (3, 4, 7, 9)  # any label size, labels never resized


def test_input_stats_standardise_each_point():
    head = SegHead("last", 16, 4, skip="mid", skip_channels=8)
    x = feats()
    stats = {k: (v.mean((0, 2, 3)), v.std((0, 2, 3))) for k, v in x.items()}
    head.set_input_stats(stats)
    z = head.norm_last(x["last"])
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)


def test_bad_fusion_and_skip_equal_to_last_are_config_errors():
    with pytest.raises(ConfigError, match="fusion must be one of"):
        SegHead("last", 16, 4, skip="mid", skip_channels=8, fusion="add")
    with pytest.raises(ConfigError, match="must differ"):
        SegHead("last", 16, 4, skip="last", skip_channels=16)
    assert upsample(torch.ones(1, 1, 4, 4), (4, 4)).shape == (1, 1, 4, 4)


def test_frozen_backbone_keeps_bn_stats_and_params_byte_identical_after_an_epoch(tmp_path):
    model = ft.TinyResNet()
    before = copy.deepcopy(model.state_dict())
    frozen = FrozenBackbone(model, ["layer1.0", "layer1.1"])
    ds = featlab.load_dataset("shapes", "train", size=32, length=16)
    val = featlab.load_dataset("shapes", "val", size=32, length=8)
    torch.manual_seed(0)
    head = SegHead("layer1.1", 16, 9, skip="layer1.0", skip_channels=8)
    settings = HeadSettings(skip="layer1.0", epochs=1, batch_size=8, lr=0.05)
    joint = _Joint(head, frozen)
    opt = _optimizer(joint, settings)
    # the optimizer receives the head's parameters only
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in head.parameters()}
    head_before = copy.deepcopy(head.state_dict())
    r = fit(head, ImageSource(ds, range(16), frozen, SPEC, head.points),
            ImageSource(val, range(8), frozen, SPEC, head.points), settings, tmp_path,
            device="cpu", progress=False, backbone=frozen, classes=ds.classes)
    assert r.epochs_done == 1 and not frozen.training and not model.training
    after = model.state_dict()
    for key, value in before.items():  # running_mean/var, num_batches_tracked, weights
        assert torch.equal(after[key], value), key
    assert any(not torch.equal(head.state_dict()[k], v) for k, v in head_before.items())


def test_finetuning_moves_the_backbone_and_its_bn_stats(tmp_path):
    model = ft.TinyResNet()
    before = copy.deepcopy(model.state_dict())
    ds = featlab.load_dataset("shapes", "train", size=32, length=16)
    points = ["layer1.1", "layer1.0"]
    torch.manual_seed(0)
    head = SegHead("layer1.1", 16, 9, skip="layer1.0", skip_channels=8)
    settings = HeadSettings(skip="layer1.0", epochs=1, batch_size=8, lr=0.05, finetune=True)
    fit(head, ImageSource(ds, range(16), model, SPEC, points, True),
        ImageSource(ds, range(8), model, SPEC, points, True), settings, tmp_path,
        device="cpu", progress=False, backbone=model, classes=ds.classes)
    after = model.state_dict()
    assert not torch.equal(after["bn1.running_mean"], before["bn1.running_mean"])
    assert not torch.equal(after["conv1.weight"], before["conv1.weight"])


def test_image_source_stats_leave_the_backbone_as_they_found_it():
    model = ft.TinyResNet().train()
    ds = featlab.load_dataset("shapes", "train", size=32, length=20)
    points = ["layer1.0", "layer1.1"]
    tuned = ImageSource(ds, range(20), model, SPEC, points, True).stats()
    assert model.training and all(p.requires_grad for p in model.parameters())
    frozen = ImageSource(ds, range(20), FrozenBackbone(copy.deepcopy(model), points), SPEC,
                         points).stats()
    for name in points:  # eval-mode features either way: the same statistics
        for a, b in zip(tuned[name], frozen[name]):
            torch.testing.assert_close(a, b)
    assert tuned["layer1.1"][0].shape == (16,)


def test_training_from_images_is_training_from_the_cache(tmp_path):
    # the same head, standardisation and batches: from images (the source's own backbone and
    # statistics, as the README writes it) or from a float32 cache of the same samples
    from featlab.segment.sources import CacheSource

    from .conftest import make_caches

    train_h5, val_h5 = make_caches(tmp_path, n_train=80, n_val=8)  # more than 64 samples
    train, val = featlab.open_cache(train_h5), featlab.open_cache(val_h5)
    points = ["layer1.1", "layer1.0"]
    frozen = FrozenBackbone(ft.TinyResNet(), points)
    images = [ImageSource(featlab.load_dataset("shapes", split, size=32, length=n), c.index,
                          frozen, SPEC, points) for split, n, c in (("train", 80, train),
                                                                    ("val", 8, val))]
    caches = [CacheSource(c, points) for c in (train, val)]
    for a, b in zip(images[0].stats().values(), caches[0].stats().values()):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    settings = HeadSettings(skip="layer1.0", epochs=1, batch_size=16, lr=0.05)
    results = []
    for kind, (src, vsrc) in (("images", images), ("cache", caches)):
        torch.manual_seed(0)
        head = SegHead("layer1.1", 16, 9, skip="layer1.0", skip_channels=8)
        head.set_input_stats(src.stats())
        results.append(fit(head, src, vsrc, settings, tmp_path / kind, device="cpu",
                           progress=False, classes=train.classes))
    assert results[0].history[0]["loss"] == pytest.approx(results[1].history[0]["loss"],
                                                          rel=1e-4)
    assert results[0].miou == pytest.approx(results[1].miou, abs=1e-3)
