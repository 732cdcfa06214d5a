"""Segmentation metrics from one data-set-level confusion matrix (field notes R-2).

mIoU is computed once over the whole split, never averaged over images or batches: per-class
IoU = TP / (TP + FP + FN) from int64 counts accumulated over every pixel that is not ignored,
and mIoU = the mean over classes whose union is not empty. A class that appears neither in the
labels nor in the predictions has IoU NaN and is listed in ``absent``. Metrics are meant to be
computed at the label's native resolution: upsample logits to the label size, never resize
labels.

Example:
    >>> import numpy as np
    >>> cm = ConfusionMatrix(3).update(np.array([[0, 1], [2, 2]]), np.array([[0, 1], [1, 255]]))
    >>> cm.matrix.tolist()  # rows: label, columns: prediction
    [[1, 0, 0], [0, 1, 1], [0, 0, 0]]
    >>> cm.iou().round(3).tolist()
    [1.0, 0.5, 0.0]
    >>> round(cm.miou(), 3), round(cm.pixel_accuracy(), 3)
    (0.5, 0.667)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from featlab.errors import ConfigError

__all__ = ["ConfusionMatrix", "miou_per_image_mean"]


def _as_int64_tensor(x: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ConfigError(f"{what} must hold integer class indices; got dtype {t.dtype}. Fix: "
                          "pass logits.argmax(1) as the prediction and integer label maps.")
    return t.to(torch.int64)


class ConfusionMatrix:
    """Accumulates a ``[C, C]`` int64 confusion matrix (rows: label, columns: prediction).

    Args:
        num_classes: C, the number of classes (labels are ``0 .. C-1``).
        ignore_index: the label value that is excluded from every count (255 by default);
            None means no label is ignored, and a 255 in a label map is then an error.
        device: where the counts live (``update`` accepts tensors on that device; use the
            training device to avoid copies).

    Labels outside ``[0, C)`` (other than ``ignore_index``) raise :class:`ConfigError`: a
    binary mask stored as 0/255 is caught instead of silently counted. Predictions outside
    ``[0, C)`` raise too.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = 255, *,
                 device: str | torch.device = "cpu"):
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be an int >= 1; got {num_classes!r}.")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    # ---- accumulating ------------------------------------------------------------------------
    def update(self, pred: Any, target: Any) -> ConfusionMatrix:
        """Add the pixels of ``pred`` and ``target`` (same shape, integer class maps)."""
        p = _as_int64_tensor(pred, "pred").to(self.counts.device)
        t = _as_int64_tensor(target, "target").to(self.counts.device)
        if p.shape != t.shape:
            raise ConfigError(f"pred and target must have the same shape; got {tuple(p.shape)} "
                              f"and {tuple(t.shape)}. Fix: upsample the logits to the label "
                              "size before argmax (labels are never resized).")
        c = self.num_classes
        keep = t != self.ignore_index if self.ignore_index is not None else torch.ones_like(
            t, dtype=torch.bool)
        t, p = t[keep], p[keep]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= c):
            bad = int(t[(t < 0) | (t >= c)][0])
            hint = (f" (ignore_index is {self.ignore_index})" if self.ignore_index is not None
                    else " and ignore_index is None")
            raise ConfigError(f"labels must lie in [0, {c}) or equal the ignore index{hint}; "
                              f"got {bad}. Fix: check num_classes, or pass ignore_index=255 "
                              "for masks that mark ignored pixels with 255.")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            raise ConfigError(f"predictions must lie in [0, {c}); got values from "
                              f"{int(p.min())} to {int(p.max())}. Fix: check num_classes.")
        self.counts += torch.bincount(t * c + p, minlength=c * c).reshape(c, c)
        return self

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Add another matrix's counts (e.g. from another process or split)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ConfigError("confusion matrices must have the same num_classes and "
                              f"ignore_index to merge; got {other.num_classes}/"
                              f"{other.ignore_index} and {self.num_classes}/{self.ignore_index}.")
        self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce(self) -> ConfusionMatrix:
        """Sum the counts over all ranks of the default process group (no-op without one)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM)
        return self

    def reset(self) -> None:
        self.counts.zero_()

    # ---- metrics -----------------------------------------------------------------------------
    @property
    def matrix(self) -> np.ndarray:
        """The ``[C, C]`` int64 counts as numpy (rows: label, columns: prediction)."""
        return self.counts.cpu().numpy()

    def iou(self) -> np.ndarray:
        """Per-class IoU, NaN for classes with an empty union (absent from labels and preds)."""
        return _iou(self.matrix)

    def miou(self) -> float:
        """Data-set-level mean IoU over the classes with a non-empty union (NaN if none)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan

    def pixel_accuracy(self) -> float:
        m = self.matrix
        total = m.sum()
        return float(np.trace(m) / total) if total else math.nan

    def class_accuracy(self) -> np.ndarray:
        """Per-class recall, NaN for classes absent from the labels."""
        m = self.matrix.astype(np.float64)
        support = m.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(support > 0, np.diag(m) / support, np.nan)

    def mean_accuracy(self) -> float:
        """Mean of the per-class accuracies over classes present in the labels."""
        acc = self.class_accuracy()
        return float(np.nanmean(acc)) if np.isfinite(acc).any() else math.nan

    def absent(self) -> list[int]:
        """Classes with an empty union: their IoU is NaN and mIoU leaves them out."""
        return [int(i) for i in np.flatnonzero(np.isnan(self.iou()))]

    def to_dict(self, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
        """Plain summary: ``miou_dataset``, accuracies, per-class IoU (None for NaN), counts."""
        names = list(class_names) if class_names is not None else [
            str(i) for i in range(self.num_classes)]
        if len(names) != self.num_classes:
            raise ConfigError(f"class_names must have {self.num_classes} names; got "
                              f"{len(names)}.")

        def clean(x: float) -> float | None:
            return None if math.isnan(x) else float(x)

        return {
            "miou_dataset": clean(self.miou()),
            "pixel_accuracy": clean(self.pixel_accuracy()),
            "mean_accuracy": clean(self.mean_accuracy()),
            "iou": {n: clean(v) for n, v in zip(names, self.iou())},
            "absent": [names[i] for i in self.absent()],
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "matrix": self.matrix.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> ConfusionMatrix:
        """Rebuild from :meth:`to_dict` output (the counts are what matters)."""
        cm = cls(int(d["num_classes"]), d["ignore_index"])
        cm.counts = torch.as_tensor(d["matrix"], dtype=torch.int64)
        if cm.counts.shape != (cm.num_classes, cm.num_classes):
            raise ConfigError(f"matrix must be {cm.num_classes}x{cm.num_classes}; got "
                              f"{tuple(cm.counts.shape)}.")
        return cm

    def __repr__(self) -> str:
        return (f"ConfusionMatrix(num_classes={self.num_classes}, pixels={int(self.counts.sum())}"
                f", miou={self.miou():.4f})")


def miou_per_image_mean(matrices: Any) -> float:
    """The mean over images of each image's mIoU (over the classes with a non-empty union in
    that image; images without a labelled pixel are left out), from ``[N, C, C]`` per-image
    confusion matrices. Not the data-set mIoU (``miou_dataset``, R-2.1): it weighs every image
    alike and every class an image happens to show; named so that nobody takes one for the other
    (R-2.4). NaN when no image has a labelled pixel.

    Examples:
        >>> one = [[2, 0], [0, 0]]                      # class 0 only, all right: IoU 1
        >>> two = [[1, 1], [0, 2]]                      # IoU 1/2 and 2/3
        >>> round(miou_per_image_mean([one, two]), 4)  # (1 + 7/12) / 2
        0.7917
    """
    per_image = [float(np.nanmean(row)) for row in _iou(matrices) if np.isfinite(row).any()]
    return float(np.mean(per_image)) if per_image else math.nan


def _iou(counts: Any) -> np.ndarray:
    """IoU per class of ``[..., C, C]`` counts (rows: label), NaN where the union is empty."""
    return _iou_of(*_class_totals(counts))


def _class_totals(counts: Any) -> tuple[np.ndarray, np.ndarray]:
    """``(true positives, row + column sums)`` per class of ``[..., C, C]`` counts, float64: all
    that IoU needs, and additive over images (a sum of confusion matrices has the sum of their
    totals), so a resampled data set's IoU can be had from ``2C`` numbers per image."""
    m = np.asarray(counts)
    if not np.issubdtype(m.dtype, np.integer):
        m = m.astype(np.float64, copy=False)
    # integer counts are summed as integers (exact), then made float64: no float copy of m
    tp, sums = np.diagonal(m, axis1=-2, axis2=-1), m.sum(-2) + m.sum(-1)
    return tp.astype(np.float64), sums.astype(np.float64)


def _iou_of(tp: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """IoU per class from :func:`_class_totals`, NaN where the union is empty."""
    union = sums - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)

