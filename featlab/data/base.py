"""The protocol every featlab data set follows.

A :class:`SegmentationDataset` is a map-style ``torch.utils.data.Dataset`` whose sample ``i`` is
``{"image": float32 [3, H, W] in [0, 1], "mask": uint8 [H, W], "id": str, "index": i}``. Masks
hold class indices ``0 .. num_classes - 1`` and ``ignore_index`` (255) for pixels that count in
no metric. ``ids`` lists the sample ids in the one fixed, sorted order the data set iterates in
(ids[i] is sample i), so that caches written from it can be joined sample by sample.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from featlab.errors import ConfigError

__all__ = ["IGNORE_INDEX", "SegmentationDataset"]

IGNORE_INDEX = 255


def check_size(size: object) -> int | None:
    """Validate the ``size`` argument shared by all data sets (None or a positive int)."""
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(
            f"`size` must be a positive int (the side of the square crop) or None (native "
            f"size); got {size!r}. Fix: pass e.g. size=128 (--input-size 128)."
        )
    return int(size)


def check_seed(seed: object) -> int:
    """Validate a seed (a non-negative int: ``np.random.default_rng`` takes no negatives)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"`seed` must be a non-negative int; got {seed!r}. Fix: pass e.g. "
                          f"seed=0.")
    return int(seed)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` -> contiguous float32 ``[3, H, W]`` in [0, 1].

    Examples:
        >>> image_to_tensor(np.full((2, 3, 3), 255, np.uint8)).shape
        torch.Size([3, 2, 3])
    """
    out = torch.from_numpy(image).permute(2, 0, 1)  # any strides: shapes hands in planar views
    return out.to(torch.float32, memory_format=torch.contiguous_format).div_(255.0)


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of every featlab data set: images, masks, sample ids and class names.

    Subclasses set ``classes`` and ``ids`` in ``__init__`` and implement :meth:`sample`.

    Attributes:
        name: registry name (``"shapes"``, ``"voc"``, ...).
        split: the split this object holds.
        classes: class names; index ``k`` of a mask is ``classes[k]``.
        ignore_index: mask value of pixels that belong to no class (always 255).
        ids: sample ids in the fixed, sorted iteration order.
        size: side of the square the samples are resized and cropped to, or None (native).
    """

    name: str = ""
    ignore_index: int = IGNORE_INDEX

    def __init__(self, split: str, *, root: str | None = None, size: int | None = None,
                 seed: int = 0) -> None:
        self.split = split
        self.root = root
        self.size = check_size(size)
        self.seed = check_seed(seed)
        self.classes: tuple[str, ...] = ()
        self.ids: list[str] = []

    @property
    def num_classes(self) -> int:
        """Number of classes (the ignore index is not one of them)."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        i = self._check_index(index)
        image, mask = self.sample(i)
        return {"image": image_to_tensor(image), "mask": torch.from_numpy(mask), "id": self.ids[i],
                "index": i}

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample ``i`` as numpy arrays: image uint8 ``[H, W, 3]`` and mask uint8 ``[H, W]``,
        after the data set's transform (``size``)."""
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """Data-set-specific settings beyond name, split, root, size and seed."""
        return {}

    def settings(self) -> dict[str, Any]:
        """Everything needed to rebuild this data set: ``load_dataset(**ds.settings())``."""
        root = None if self.root is None else str(self.root)
        return {"name": self.name, "split": self.split, "root": root, "size": self.size,
                "seed": self.seed, **self.options()}

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"sample index must be an int; got {type(index).__name__}")
        n = len(self.ids)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            # IndexError (not a FeatlabError): the sequence protocol relies on it
            raise IndexError(f"sample index {index} out of range for {n} samples")
        return i

    def __repr__(self) -> str:
        size = "native" if self.size is None else self.size
        return (f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, "
                f"samples={len(self)}, classes={self.num_classes}, size={size})")
