"""A ``torch.utils.data.Dataset`` view of a cache, for training heads on stored features.

Made by :meth:`featlab.cache.reader.CacheReader.dataset`. It holds the reader, which pickles
without its HDF5 handle and reopens the file lazily in each worker process (R-13.2), so it works
with ``DataLoader(num_workers>0)`` under fork, forkserver and spawn. ``__getitems__`` lets the
``DataLoader`` read a whole batch with one read per point instead of one per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from featlab.cache._reading import split_key

__all__ = ["CacheDataset"]


class CacheDataset(Dataset):
    """Samples of a cache as dicts of tensors.

    Attributes:
        cache: the :class:`~featlab.cache.reader.CacheReader` (its snapshot of written samples).
        points: names of the points in each item.
        labels / images: whether items carry ``"labels"`` ``[H, W]`` / ``"images"``
            ``[3, H, W]`` (uint8, as stored).
        dtype: dtype the point tensors are cast to (None: as stored).
    """

    def __init__(self, cache, points: Sequence[str], *, labels: bool = True,
                 images: bool = False, dtype: torch.dtype | None = None):
        self.cache, self.points = cache, list(points)
        self.labels, self.images, self.dtype = labels, images, dtype

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: Sequence[int]) -> list[dict]:
        positions, _, _ = split_key(np.asarray(indices, dtype=np.int64), len(self.cache))
        data = self.cache._read(self.cache._rows[positions], self.points, self.labels,
                                self.images)
        ids, index = self.cache._ids, self.cache._index
        items = []
        for j, pos in enumerate(positions.tolist()):
            item = {"id": ids[pos], "index": int(index[pos]), "row": pos}
            for key, array in data.items():
                tensor = torch.from_numpy(array[j])
                item[key] = tensor.to(self.dtype) if self.dtype and key in self.points else tensor
            items.append(item)
        return items

    def __repr__(self) -> str:
        return (f"CacheDataset({str(self.cache.path)!r}, points={self.points}, "
                f"n={len(self)}, labels={self.labels}, images={self.images})")
