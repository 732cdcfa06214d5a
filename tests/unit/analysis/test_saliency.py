"""Saliency maps against Captum, hooks, targets and the pointing-game summary."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import featlab
import featlab.testing as ft
from featlab.analysis import saliency as S
from featlab.analysis.saliency_summary import (SaliencyResult, dominant_class, energy_in_mask,
                                               plot_saliency_grid, saliency_examples,
                                               saliency_summary, write_summary)
from featlab.errors import ConfigError

captum_attr = pytest.importorskip("captum.attr")  # a test dependency (pyproject `test` extra)

POINTS = ["relu", "layer1.0", "layer1.1"]


class TinySeg(nn.Module):
    """A TinyResNet trunk with a 1x1 classifier upsampled to the input: [N, 4, H, W] logits."""

    def __init__(self):
        super().__init__()
        self.trunk = ft.TinyResNet()
        self.head = nn.Conv2d(16, 4, 1)
        torch.nn.init.normal_(self.head.weight, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        t = self.trunk
        f = t.layer1(t.relu(t.bn1(t.conv1(x))))
        return F.interpolate(self.head(f), size=x.shape[-2:], mode="bilinear",
                             align_corners=False)


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_backward_pre_hooks", {})) for m in model.modules())


@pytest.mark.parametrize("relu", [False, True])
def test_grad_cam_equals_captum_layer_grad_cam_at_every_point(relu):
    net, x = ft.TinyResNet(), ft.random_images(3, 32)
    maps = S.grad_cam(net, x, [1, 2, 7], POINTS, relu=relu)
    modules = dict(net.named_modules())
    for name in POINTS:
        ref = captum_attr.LayerGradCam(net, modules[name]).attribute(
            x, target=[1, 2, 7], relu_attributions=relu)
        torch.testing.assert_close(maps[name].native, ref[:, 0], atol=1e-6, rtol=1e-5)
        up = captum_attr.LayerAttribution.interpolate(ref, (32, 32), "bilinear")
        torch.testing.assert_close(maps[name].upsampled, up[:, 0], atol=1e-6, rtol=1e-5)
        assert maps[name].relu is relu and maps[name].interpolation == "bilinear"


def test_grad_cam_on_resnet18_with_in_place_blocks_equals_captum():
    model, _ = featlab.get_backbone("resnet18", weights="none")
    x = ft.random_images(2, 64)
    maps = S.grad_cam(model, x, 5, ["layer1.0", "layer2.1", "layer4.1"], relu=False)
    for name in maps:
        ref = captum_attr.LayerGradCam(model, dict(model.named_modules())[name]).attribute(
            x, target=5)
        torch.testing.assert_close(maps[name].native, ref[:, 0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("relu", [False, True])
def test_layer_cam_is_positive_gradients_times_activations_from_captum(relu):
    """LayerCAM from Captum's layer gradients and activations (an independent pass each)."""
    model, _ = featlab.get_backbone("resnet18", weights="none")
    x = ft.random_images(2, 64)
    points = ["layer1.0.bn2", "layer1.0", "layer3.1"]  # bn2: signed, before the residual add
    maps = S.layer_cam(model, x, [5, 2], points, relu=relu)
    modules = dict(model.named_modules())
    for name in points:
        grad = captum_attr.LayerGradientXActivation(
            model, modules[name], multiply_by_inputs=False).attribute(x, target=[5, 2])
        act = captum_attr.LayerActivation(model, modules[name]).attribute(x)
        ref = (grad.clamp(min=0) * act).sum(1)
        ref = ref.clamp(min=0) if relu else ref
        torch.testing.assert_close(maps[name].native, ref, atol=1e-5, rtol=1e-4)
        assert maps[name].method == "layercam" and maps[name].relu is relu
    cam = S.grad_cam(model, x, [5, 2], ["layer1.0.bn2"], relu=relu)["layer1.0.bn2"].native
    assert not torch.allclose(cam, maps["layer1.0.bn2"].native)  # not Grad-CAM renamed


def test_input_gradient_equals_captum_saliency():
    net, x = ft.TinyResNet(), ft.random_images(2, 32)
    grad = S.gradients(net, x, 4, ["input"])["input"][1]
    ref = captum_attr.Saliency(net).attribute(x.clone().requires_grad_(), target=4)
    torch.testing.assert_close(grad.abs(), ref, atol=1e-7, rtol=1e-6)
    m = S.saliency(net, x, 4, ["input"])["input"]
    torch.testing.assert_close(m.native, ref.mean(1), atol=1e-7, rtol=1e-6)


def test_integrated_gradients_equal_captum_and_are_complete():
    net, x = ft.TinyResNet(), ft.random_images(2, 32)
    ig = S.integrated_gradients(net, x, 4, ["input", "layer1.1"], n_steps=16)
    ref = captum_attr.IntegratedGradients(net).attribute(x, target=4, n_steps=16,
                                                         method="riemann_middle")
    torch.testing.assert_close(ig["input"].native, ref.sum(1), atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        delta = net(x)[:, 4] - net(torch.zeros_like(x))[:, 4]
    # completeness holds approximately at a point too (same path, same steps)
    for name in ("input", "layer1.1"):
        torch.testing.assert_close(ig[name].native.sum((1, 2)), delta, atol=2e-3, rtol=0.05)


def test_smoothgrad_is_seeded_and_averages_noisy_saliency():
    net, x = ft.TinyResNet(), ft.random_images(1, 32)
    a = S.smoothgrad(net, x, 2, ["input", "layer1.1"], n_samples=4, seed=3)
    b = S.smoothgrad(net, x, 2, ["input", "layer1.1"], n_samples=4, seed=3)
    c = S.smoothgrad(net, x, 2, ["input", "layer1.1"], n_samples=4, seed=4)
    torch.testing.assert_close(a["layer1.1"].native, b["layer1.1"].native)
    assert not torch.equal(a["input"].native, c["input"].native)
    # each sample's noise from its own generator, seeded by (seed, index in the data set)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([3, 5]).generate_state(
        1, np.uint64)[0]))
    span = x.max() - x.min()
    manual = sum(S.saliency(net, x + torch.randn(x.shape, generator=g) * 0.15 * span, 2,
                            ["input"])["input"].native for _ in range(4)) / 4
    fifth = S.smoothgrad(net, x, 2, ["input"], n_samples=4, seed=3, first=5)
    torch.testing.assert_close(fifth["input"].native, manual)
    # a sample's map does not depend on its batch: samples 0-2 at once equal one at a time
    xs = ft.random_images(3, 32, seed=1)
    whole = S.smoothgrad(net, xs, 2, ["layer1.1"], n_samples=2, seed=3)["layer1.1"].native
    alone = torch.cat([S.smoothgrad(net, xs[i:i + 1], 2, ["layer1.1"], n_samples=2, seed=3,
                                    first=i)["layer1.1"].native for i in range(3)])
    torch.testing.assert_close(whole, alone, rtol=1e-5, atol=1e-6)


def test_one_forward_and_one_backward_for_all_points():
    net, x = ft.TinyResNet(), ft.random_images(2, 32)
    calls = []
    handle = net.register_forward_hook(lambda *a: calls.append(1))
    try:
        S.grad_cam(net, x, 1, POINTS)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_hundred_calls_leave_no_hooks_and_no_growth():
    net, x = ft.TinyResNet(), ft.random_images(1, 16)
    for i in range(100):
        S.grad_cam(net, x, 1, POINTS)
        S.saliency(net, x, 1, ["input", "layer1.0"])
        if i == 10:
            gc.collect()
            before = sum(type(o) is torch.Tensor for o in gc.get_objects())
    gc.collect()
    after = sum(type(o) is torch.Tensor for o in gc.get_objects())
    assert hooks(net) == 0
    assert after <= before + 5
    assert not any(m.training for m in net.modules())


def test_hooks_are_removed_when_the_objective_fails():
    net = ft.TinyResNet()
    with pytest.raises(ConfigError, match="target must be"):
        S.grad_cam(net, ft.random_images(1, 16), 99, POINTS)
    assert hooks(net) == 0


def test_segmentation_targets():
    seg, x = TinySeg().eval(), ft.random_images(2, 32)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:12, 20:30] = True
    full = S.gradients(seg, x, S.ClassRegion(1), ["input"])["input"][1]
    x1 = x.clone().requires_grad_()
    seg(x1)[:, 1].sum().backward()
    torch.testing.assert_close(full, x1.grad)
    region = S.gradients(seg, x, S.ClassRegion(1, mask), ["input"])["input"][1]
    x2 = x.clone().requires_grad_()
    (seg(x2)[:, 1] * mask).sum().backward()
    torch.testing.assert_close(region, x2.grad)
    # an int on a segmentation output is the whole-image region
    torch.testing.assert_close(S.gradients(seg, x, 1, ["input"])["input"][1], full)
    # a pixel target's input gradient vanishes outside its receptive field
    # (layer1.1: rf 23 px, stride 4, then bilinear upsampling: well inside 24 px)
    g = S.gradients(seg, x, S.Pixel(2, 2, 3), ["input"])["input"][1].abs().sum((0, 1))
    assert g[2, 3] > 0 and g[24:].sum() == 0 and g[:, 24:].sum() == 0
    with torch.no_grad():
        winner = seg(x).argmax(1)
    cls = int(winner.flatten().mode().values)
    pred = S.gradients(seg, x, S.ClassRegion(cls, "pred"), ["input"])["input"][1]
    x3 = x.clone().requires_grad_()
    (seg(x3)[:, cls] * (winner == cls)).sum().backward()
    assert pred.abs().sum() > 0
    torch.testing.assert_close(pred, x3.grad)
    with pytest.raises(ConfigError, match="output size"):
        S.gradients(seg, x, S.ClassRegion(1, mask[:16]), ["input"])
    with pytest.raises(ConfigError, match="ClassLogit needs"):
        S.gradients(seg, x, S.ClassLogit(1), ["input"])


def test_grad_cam_rejects_the_input_point_and_unknown_methods():
    net, x = ft.TinyResNet(), ft.random_images(1, 16)
    with pytest.raises(ConfigError, match="feature maps"):
        S.grad_cam(net, x, 1, ["input", "layer1.0"])
    with pytest.raises(ConfigError, match="method"):
        S.attribute(net, x, 1, POINTS, method="lime")


# ---- pointing game ---------------------------------------------------------------------------
def test_energy_in_mask_by_hand():
    maps = torch.tensor([[[2.0, -1.0], [1.0, 1.0]], [[-1.0, -2.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, True], [False, False]], [[True, False], [False, False]]])
    e = energy_in_mask(maps, masks)
    assert e[0].item() == pytest.approx(0.5) and np.isnan(e[1].item())
    assert dominant_class(np.array([[0, 3, 3], [255, 1, 0]])) == 3
    assert dominant_class(np.zeros((2, 2), int)) is None


def test_a_sample_without_saliency_leaves_both_columns(monkeypatch):
    """A map with no positive mass scores NaN: the sample leaves that point's energy and its
    uniform-map baseline alike, so the two stay comparable."""
    import featlab.analysis.saliency_summary as summary

    net = ft.TinyResNet()
    ds = featlab.load_dataset("shapes", split="val", size=32, length=6)
    real = summary.attribute

    def first_map_empty(*args, **kwargs):
        maps = real(*args, **kwargs)
        maps["layer1.1"].upsampled[0] = 0.0
        return maps

    monkeypatch.setattr(summary, "attribute", first_map_empty)
    rows = {r["point"]: r for r in saliency_summary(net, ds, ["layer1.0", "layer1.1"],
                                                     method="saliency", batch_size=8,
                                                     progress=False).rows()}
    masks = [ds[i]["mask"] == dominant_class(ds[i]["mask"].numpy()) for i in range(len(ds))
             if dominant_class(ds[i]["mask"].numpy()) is not None]
    fractions = [m.double().mean().item() for m in masks]
    assert rows["layer1.0"]["samples"] == len(masks) == rows["layer1.1"]["samples"] + 1
    assert rows["layer1.0"]["mask_fraction"] == pytest.approx(np.mean(fractions))
    assert rows["layer1.1"]["mask_fraction"] == pytest.approx(np.mean(fractions[1:]))


def test_smoothgrad_scores_do_not_depend_on_the_batch_size_and_record_their_options():
    net = ft.TinyResNet()
    ds = featlab.load_dataset("shapes", split="val", size=32, length=6)
    runs = [saliency_summary(net, ds, ["layer1.1"], method="smoothgrad", batch_size=b,
                             n_samples=2, progress=False) for b in (2, 4)]
    assert runs[0].rows()[0]["energy_in_mask"] == pytest.approx(
        runs[1].rows()[0]["energy_in_mask"], rel=1e-6)
    assert runs[0].settings["n_samples"] == 2 and runs[0].settings["stdev"] == 0.15  # default
    ig = saliency_summary(net, ds, ["layer1.1"], method="ig", limit=2, progress=False)
    assert ig.settings["n_steps"] == 32 and ig.settings["method"] == "riemann_middle"


def test_saliency_summary_and_outputs(tmp_path):
    net = ft.TinyResNet()
    ds = featlab.load_dataset("shapes", split="val", size=32, length=6)
    result = saliency_summary(net, ds, ["input", "layer1.0", "layer1.1"], method="saliency",
                              batch_size=4, progress=False)
    rows = result.rows()
    assert [r["point"] for r in rows] == ["input", "layer1.0", "layer1.1"]
    assert [r["stride"] for r in rows] == [1, 2, 4]
    # independent recomputation for one point
    energies, fractions = [], []
    for i in range(len(ds)):
        s = ds[i]
        cls = dominant_class(s["mask"].numpy())
        if cls is None:
            continue
        m = S.saliency(net, s["image"][None], cls, ["layer1.1"])["layer1.1"].upsampled[0]
        mask = s["mask"] == cls
        energies.append((m.clamp(min=0) * mask).sum().item() / m.clamp(min=0).sum().item())
        fractions.append(mask.double().mean().item())
    assert rows[2]["energy_in_mask"] == pytest.approx(np.mean(energies), rel=1e-5)
    assert rows[2]["mask_fraction"] == pytest.approx(np.mean(fractions))
    assert rows[2]["samples"] == len(energies)
    js, cs = write_summary(result, tmp_path)
    assert SaliencyResult.from_dict(__import__("json").loads(js.read_text())) == result
    with pytest.raises(ConfigError, match="overwrite"):
        write_summary(result, tmp_path)
    with pytest.raises(ConfigError, match="`limit` of saliency_summary must be a positive"):
        saliency_summary(net, ds, ["layer1.1"], limit=0, progress=False)
    ex = saliency_examples(net, ds, ["layer1.0", "layer1.1"], count=2)
    png = plot_saliency_grid(ex, tmp_path / "grid.png", class_names=ds.classes)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert ex["maps"]["layer1.1"].shape == (2, 32, 32)


def test_a_classifier_with_fewer_outputs_than_the_classes_is_named_with_both_counts():
    net = ft.TinyResNet()  # 10 outputs
    net.fc = torch.nn.Linear(net.fc.in_features, 2)
    ds = featlab.load_dataset("shapes", split="val", size=32, length=6)
    with pytest.raises(ConfigError, match=r"it has 2 outputs, and shapes has 9 classes \(a "
                                          r"sample's target is class [2-8]\)\. Fix: use weights "
                                          r"trained on the classes of shapes"):
        saliency_summary(net, ds, ["layer1.1"], progress=False)
