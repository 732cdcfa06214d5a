"""Lazy per-point arrays of a cache: ``cache["layer3"]``, ``cache.labels``, ``cache.images``.

Examples:
    >>> arr = cache["layer3"]  # doctest: +SKIP
    >>> arr.shape, arr[[7, 2]].shape, arr.torch(slice(0, 8)).dtype  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from featlab.cache._reading import read_rows, split_key

if TYPE_CHECKING:
    import torch

    from featlab.cache.reader import CacheReader

__all__ = ["CacheArray"]


class CacheArray:
    """A lazy ``[n, ...]`` array of one dataset of a cache, over the reader's exposed samples.

    ``shape``, ``dtype`` and ``len`` read nothing; indexing reads only the rows asked for: an
    int, a slice, an int array in any order (repeats allowed) or a boolean mask, optionally
    followed by indices of the other axes (``arr[[3, 1], 0]``). Results are numpy arrays;
    :meth:`torch` returns a tensor.
    """

    def __init__(self, reader: CacheReader, name: str):
        self._reader, self.name = reader, name
        tail, self.dtype = reader._arrays[name]
        self._tail = tuple(tail)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._reader), *self._tail)

    ndim = property(lambda self: 1 + len(self._tail))
    size = property(lambda self: int(np.prod(self.shape)))
    nbytes = property(lambda self: self.size * self.dtype.itemsize)

    def __len__(self) -> int:
        return len(self._reader)

    def __getitem__(self, key) -> np.ndarray:
        positions, drop, rest = split_key(key, len(self._reader))
        data = read_rows(self._reader._dataset(self.name), self._reader._rows[positions], rest)
        return data[0] if drop else data

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)

    def torch(self, key=slice(None)) -> torch.Tensor:
        """``self[key]`` as a tensor (dtype kept: float16 stays float16)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self[key]))

    def __repr__(self) -> str:
        return f"CacheArray({self.name!r}, shape={self.shape}, dtype={self.dtype})"
