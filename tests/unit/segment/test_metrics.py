"""ConfusionMatrix against hand counts, an mmseg-style reference and torchmetrics (R-2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from featlab.errors import ConfigError
from featlab.segment.metrics import ConfusionMatrix


def test_hand_computed_three_class_example():
    target = np.array([[0, 0, 1], [1, 2, 255]])
    pred = np.array([[0, 1, 1], [2, 2, 0]])
    cm = ConfusionMatrix(3).update(pred, target)
    # label 0: preds 0,1 | label 1: preds 1,2 | label 2: pred 2 | the 255 pixel is not counted
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 1, 1], [0, 0, 1]]
    np.testing.assert_allclose(cm.iou(), [1 / 2, 1 / 3, 1 / 2])
    assert cm.miou() == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)
    assert cm.mean_accuracy() == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)


def test_absent_class_is_nan_listed_and_left_out_of_miou():
    cm = ConfusionMatrix(4).update(np.array([0, 1, 1]), np.array([0, 1, 0]))
    iou = cm.iou()
    assert math.isnan(iou[2]) and math.isnan(iou[3]) and cm.absent() == [2, 3]
    assert cm.miou() == pytest.approx((1 / 2 + 1 / 2) / 2)
    d = cm.to_dict(["bg", "a", "b", "c"])
    assert d["absent"] == ["b", "c"] and d["iou"]["b"] is None
    assert ConfusionMatrix.from_dict(d).matrix.tolist() == cm.matrix.tolist()


def _mmseg_miou(preds, labels, c, ignore=255):
    """mmseg IoUMetric's formula, written independently: per-image areas summed, then IoU."""
    inter = np.zeros(c)
    area_pred = np.zeros(c)
    area_label = np.zeros(c)
    for p, t in zip(preds, labels):
        keep = t != ignore
        p, t = p[keep], t[keep]
        inter += np.histogram(p[p == t], bins=c, range=(0, c - 1))[0]
        area_pred += np.histogram(p, bins=c, range=(0, c - 1))[0]
        area_label += np.histogram(t, bins=c, range=(0, c - 1))[0]
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.nanmean(inter / union), inter / union


def test_random_data_matches_mmseg_formula_and_ignores_batching_and_order():
    rng = np.random.default_rng(0)
    c = 5
    labels = rng.integers(0, c, (12, 9, 11))
    labels[rng.random(labels.shape) < 0.1] = 255
    preds = np.where(rng.random(labels.shape) < 0.6, labels % 255, rng.integers(0, c, labels.shape))
    preds[labels == 255] = rng.integers(0, c, (labels == 255).sum())
    ref_miou, ref_iou = _mmseg_miou(preds, labels, c)

    whole = ConfusionMatrix(c).update(preds, labels)
    assert whole.miou() == pytest.approx(ref_miou, abs=1e-12)
    np.testing.assert_allclose(whole.iou(), ref_iou, atol=1e-12)

    order = rng.permutation(len(labels))
    batched = ConfusionMatrix(c)
    for chunk in np.array_split(order, 5):  # uneven batch sizes, shuffled images
        batched.update(preds[chunk], labels[chunk])
    assert batched.matrix.tolist() == whole.matrix.tolist()
    assert batched.miou() == whole.miou()  # one data-set-level mIoU, not a mean over batches
    assert batched.counts.dtype == torch.int64  # a split of Cityscapes val overflows int32

    halves = ConfusionMatrix(c).update(preds[:6], labels[:6])
    halves.merge(ConfusionMatrix(c).update(preds[6:], labels[6:]))
    assert halves.matrix.tolist() == whole.matrix.tolist()


def test_agrees_with_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    g = torch.Generator().manual_seed(1)
    c = 6
    labels = torch.randint(0, c, (8, 20, 20), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.05] = 255
    preds = torch.randint(0, c, (8, 20, 20), generator=g)
    ours = ConfusionMatrix(c).update(preds, labels)

    ref_cm = tm.MulticlassConfusionMatrix(c, ignore_index=255)(preds, labels)
    assert ours.matrix.tolist() == ref_cm.tolist()
    ref_iou = tm.MulticlassJaccardIndex(c, average=None, ignore_index=255)(preds, labels)
    np.testing.assert_allclose(ours.iou(), ref_iou.numpy(), atol=1e-6)
    ref_acc = tm.MulticlassAccuracy(c, average="micro", ignore_index=255)(preds, labels)
    assert ours.pixel_accuracy() == pytest.approx(float(ref_acc), abs=1e-6)
    ref_macc = tm.MulticlassAccuracy(c, average="macro", ignore_index=255)(preds, labels)
    assert ours.mean_accuracy() == pytest.approx(float(ref_macc), abs=1e-6)


def test_binary_mask_with_255_needs_ignore_index():
    mask = np.array([[0, 255], [255, 0]])
    pred = np.zeros((2, 2), dtype=np.int64)
    with pytest.raises(ConfigError, match=r"labels must lie in \[0, 2\).*ignore_index=255"):
        ConfusionMatrix(2, ignore_index=None).update(pred, mask)
    cm = ConfusionMatrix(2, ignore_index=255).update(pred, mask)
    assert cm.matrix.sum() == 2 and cm.matrix[0, 0] == 2


def test_bad_inputs_are_one_line_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ConfigError, match="same shape.*upsample the logits"):
        cm.update(np.zeros((2, 2), int), np.zeros((4, 4), int))
    with pytest.raises(ConfigError, match="integer class indices.*argmax"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ConfigError, match=r"predictions must lie in \[0, 3\)"):
        cm.update(np.full((2, 2), 3), np.zeros((2, 2), int))
    assert cm.matrix.sum() == 0  # a rejected batch adds nothing
