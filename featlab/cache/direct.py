"""Point rows written straight into their HDF5 chunks with ``O_DIRECT``.

A buffered ``write()`` makes the kernel copy every byte into the page cache; at 2 MB per
sample (resnet18, 128 px, all points, float16) that copy alone costs more CPU than an extractor
can spare on a small machine (``benchmarks/README.md``: the write-based floor reaches ~0.8x of
the bare forward on 2 cores, the direct-I/O floor ~0.9x). With ``O_DIRECT`` the device reads the
rows from the slot's memory itself.

The cache format does not change: a point dataset is chunked ``(k, C, h, w)`` without filters,
its storage is allocated at creation, so every chunk's file offset is known
(``get_chunk_info_by_coord``) and a row's bytes are one contiguous run inside its chunk. Rows go
direct only when everything lines up on :data:`ALIGN` bytes: the row size, the chunk offsets
(caches are created with ``alignment_threshold = alignment_interval = ALIGN``), and the source
memory (:class:`~featlab.cache.taps.Slot` allocates it so). Anything else -- no ``O_DIRECT`` on
this OS or file system, pooled points of odd sizes, a partial cache made by an older featlab --
is written by h5py as before. ``FEATLAB_DIRECT_IO=0`` turns the direct path off.
"""

from __future__ import annotations

import errno
import logging
import os

import h5py
import numpy as np

__all__ = ["ALIGN", "DirectWriter", "aligned_empty"]

log = logging.getLogger("featlab")

ALIGN = 4096


def aligned_empty(shape: tuple[int, ...], dtype, *, pin: bool = False):
    """An uninitialised torch tensor whose data starts on an :data:`ALIGN`-byte boundary."""
    import torch

    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = int(np.prod(shape)) * itemsize
    if pin:
        # CUDA's pinned blocks start on a page already; asking for ALIGN more would tip the
        # usual power-of-two sizes into the next power (torch rounds pinned requests up)
        raw = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        if raw.data_ptr() % ALIGN == 0:
            return raw.view(dtype).view(shape)
    raw = torch.empty(nbytes + ALIGN, dtype=torch.uint8, pin_memory=pin)
    skip = (-raw.data_ptr()) % ALIGN
    return raw[skip:skip + nbytes].view(dtype).view(shape)


class DirectWriter:
    """An ``O_DIRECT`` descriptor of a cache file and the rows it may write (one thread)."""

    def __init__(self, path: str):
        self.fd: int | None = None
        flag = getattr(os, "O_DIRECT", None)
        if flag is None or os.environ.get("FEATLAB_DIRECT_IO", "1") == "0":
            return
        try:
            self.fd = os.open(path, os.O_WRONLY | flag)
        except OSError as err:  # e.g. a file system without O_DIRECT
            log.debug("direct I/O unavailable for %s (%s): buffered writes", path, err)

    def eligible(self, dset: h5py.Dataset) -> bool:
        """Whether rows of ``dset`` can go direct (chunked, no filters, aligned row size)."""
        if self.fd is None or dset.chunks is None:
            return False
        row_bytes = int(np.prod(dset.shape[1:])) * dset.dtype.itemsize
        return row_bytes % ALIGN == 0 and dset.id.get_create_plist().get_nfilters() == 0

    def write(self, dset: h5py.Dataset, first: int, array: np.ndarray) -> bool:
        """Write ``array`` as rows ``first ..`` of ``dset``; False (nothing written) when the
        rows do not line up, or the file system refuses the first direct write."""
        if self.fd is None or not len(array):
            return False
        k = dset.chunks[0]
        row_bytes = array[0].nbytes
        runs: list[list[int]] = []  # [file offset, first row, end row] of contiguous runs
        for c in range(first // k, (first + len(array) - 1) // k + 1):
            lo, hi = max(first, c * k), min(first + len(array), (c + 1) * k)
            offset = dset.id.get_chunk_info_by_coord((c * k,) + (0,) * (dset.ndim - 1))
            offset = offset.byte_offset + (lo - c * k) * row_bytes
            if runs and runs[-1][0] + (runs[-1][2] - runs[-1][1]) * row_bytes == offset:
                runs[-1][2] = hi
            else:
                runs.append([offset, lo, hi])
        if any(off % ALIGN for off, _, _ in runs) or array.ctypes.data % ALIGN:
            return False
        written = 0
        try:
            for offset, lo, hi in runs:
                view = memoryview(array[lo - first:hi - first]).cast("B")
                while len(view):
                    done = os.pwrite(self.fd, view, offset)
                    view, offset, written = view[done:], offset + done, written + done
        except OSError as err:
            if err.errno != errno.EINVAL or written:
                raise  # only EINVAL before any byte means: this file system refuses O_DIRECT
            log.debug("direct I/O refused (%s): buffered writes", err)
            self.close()
            return False
        return True

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
