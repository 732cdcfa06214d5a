"""What an extraction will store, and what it costs, before it runs (``featlab extract --dry-run``).

:func:`plan_extract` is a pure function of the skip points and the settings: per point the
stored shape (after optional area pooling to ``max_size``), bytes per sample, the HDF5 chunk
rows and the total for N samples; the labels, images, ids and statistics beside them; the file
size; and the host memory one run keeps in flight and, on a GPU, the device memory (R-4.1).
The caller adds the free disk space
it measured (:func:`free_disk_bytes`), and ``plan.fits`` says whether the cache fits.

Examples:
    >>> from featlab.points import SkipPoint
    >>> p = SkipPoint("layer1", 0, "layer1", 64, (56, 56), 4, 35, 4, 13)
    >>> plan = plan_extract([p], num_samples=100, input_size=224, dtype="float16", max_size=28)
    >>> plan.points[0].stored_size, plan.points[0].bytes_per_sample
    ((28, 28), 100352)
    >>> plan.total_bytes > 100 * 100352
    True
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

from featlab._records import check_record
from featlab.cache.schema import SESSION_ATTR_BYTES
from featlab.errors import ConfigError

__all__ = ["PointPlan", "ExtractPlan", "plan_extract", "stored_size", "channel_subset",
           "chunk_rows", "free_disk_bytes", "format_bytes", "DTYPES", "CHUNK_MIN_BYTES",
           "CHUNK_MAX_BYTES"]

DTYPES = {"float16": 2, "float32": 4}
ERROR_STATS = ("bound", "exact")  # the float16 rounding error recorded (featlab.cache.taps)
COMPRESSIONS = ("lzf", "gzip")  # opt-in, applied when a cache is finalised (h5py's own filters)
CHUNK_MIN_BYTES = 2**20  # chunks of ~1-4 MB; one sample is never split
CHUNK_MAX_BYTES = 4 * 2**20
_STATS_BYTES = 8 + 4  # per sample and point: /stats/nonfinite int64 + /stats/abs_error float32
_INPUT_BYTES = 4 * 3 + 1  # per input pixel as the loader hands it over: float32 RGB + uint8 label


def stored_size(size: Sequence[int], max_size: int | None) -> tuple[int, int]:
    """The ``(h, w)`` stored for a point of ``size`` when pooled to at most ``max_size`` per side.

    The aspect ratio is kept: the longer side becomes ``max_size`` and the shorter one scales with
    it (rounded, at least 1). ``None`` or 0 means no pooling.

    Examples:
        >>> stored_size((64, 64), 32), stored_size((16, 16), 32), stored_size((64, 48), 32)
        ((32, 32), (16, 16), (32, 24))
    """
    h, w = int(size[0]), int(size[1])
    if not max_size or max(h, w) <= max_size:
        return h, w
    scale = max_size / max(h, w)
    return max(1, min(max_size, round(h * scale))), max(1, min(max_size, round(w * scale)))


def channel_subset(name: str, channels: int, max_channels: int | None, seed: int = 0
                   ) -> tuple[int, ...] | None:
    """The channels stored of a point with ``channels`` when at most ``max_channels`` are kept:
    a random subset, sorted, drawn from ``seed`` and the point's name (so a point gets the same
    subset whichever other points are extracted). ``None`` keeps every channel.

    Random rather than the first ones: where a network concatenates features (DenseNet's blocks,
    Inception's branches) channel order is not arbitrary, and the first channels would all come
    from one source.

    Examples:
        >>> channel_subset("layer4", 512, 4, seed=0) == channel_subset("layer4", 512, 4, seed=0)
        True
        >>> channel_subset("layer1", 64, 128) is None, len(channel_subset("layer4", 512, 4))
        (True, 4)
    """
    import zlib

    import numpy as np

    if not max_channels or channels <= max_channels:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
    return tuple(int(c) for c in np.sort(rng.choice(channels, max_channels, replace=False)))


def chunk_rows(row_bytes: int, num_rows: int, batch_size: int) -> int:
    """Rows per HDF5 chunk: whole samples, ~1-4 MB (R-13.1), aligned with the batches.

    A chunk never splits a sample (one sample is one contiguous read). When a batch fits in
    :data:`CHUNK_MAX_BYTES` the chunk is a multiple of the batch (the smallest reaching
    :data:`CHUNK_MIN_BYTES`), so a batch is one contiguous read and a batch write never splits
    a chunk of a large point; otherwise it is the largest divisor of the batch size that fits.

    Examples:
        >>> chunk_rows(100_000, 1000, 16), chunk_rows(300_000, 1000, 16), chunk_rows(9e6, 10, 16)
        (16, 8, 1)
        >>> chunk_rows(1_000, 10_000, 32)  # 32 kB per batch: 33 batches reach 1 MiB
        1056
    """
    row_bytes = max(1, int(row_bytes))
    fit = max(1, CHUNK_MAX_BYTES // row_bytes)
    if fit >= batch_size:
        batches = min(fit // batch_size, -(-CHUNK_MIN_BYTES // (batch_size * row_bytes)))
        k = max(1, batches) * batch_size
    else:
        k = max(d for d in range(1, fit + 1) if batch_size % d == 0)
    return max(1, min(k, num_rows))


@dataclass(frozen=True)
class PointPlan:
    """One point as it will be stored.

    Attributes:
        name, channels, stride: from the :class:`~featlab.points.SkipPoint`.
        size: the network's output ``(H, W)`` at the input size.
        stored_size: ``(h, w)`` on disk (smaller when pooled).
        pooling: ``"none"`` or ``"area"`` (adaptive average pooling).
        stored_channels: channels on disk (fewer than ``channels`` with ``max_channels``).
        bytes_per_sample: ``stored_channels * h * w * itemsize``.
        chunk_rows: samples per HDF5 chunk.
        total_bytes: for all samples.
    """

    name: str
    channels: int
    size: tuple[int, int]
    stored_size: tuple[int, int]
    stride: int
    pooling: str
    bytes_per_sample: int
    chunk_rows: int
    total_bytes: int
    stored_channels: int = 0  # 0: read as `channels` (plans from before the setting existed)

    def __post_init__(self) -> None:
        if not self.stored_channels:
            object.__setattr__(self, "stored_channels", self.channels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"], d["stored_size"] = list(self.size), list(self.stored_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PointPlan:
        check_record(cls, d)
        d = dict(d)
        d["size"], d["stored_size"] = tuple(d["size"]), tuple(d["stored_size"])
        return cls(**d)


@dataclass(frozen=True)
class ExtractPlan:
    """The storage and memory estimate of one extraction (see :func:`plan_extract`).

    Attributes:
        points: one :class:`PointPlan` per point, in execution order.
        num_samples: N.
        input_size: ``(H, W)`` of the network input (and of the stored labels).
        dtype: storage dtype of the point arrays.
        max_size: pooling bound (0 = none).
        save_images: whether ``/images`` is stored.
        batch_size: samples per forward.
        label_bytes_per_sample, image_bytes_per_sample, other_bytes_per_sample: ``/labels``,
            ``/images`` (0 when not saved), and ids + index + written flag + statistics.
        bytes_per_sample: everything stored per sample.
        total_bytes: the disk space the file takes for N samples (plus a small metadata
            allowance). Its apparent size can be larger: each chunked array's last chunk is
            allocated whole, a hole where no sample is (rows beyond N).
        host_bytes: host memory the run keeps in flight: the bounded queue of batches waiting for
            the writer, batches prefetched by the data loader, and (on the CPU) the forward's
            largest activations. It does not grow with N.
        device_bytes: on a GPU, device memory for the weights (``weight_bytes``), the forward's
            largest activations and the float16 copy of a point (0 on the CPU, where all of it
            is host memory). The CUDA context and cuDNN's workspace come on top.
        weight_bytes: parameters and buffers of the model.
        free_bytes: free disk space at the destination, when the caller measured it.
        max_channels: channel bound (0 = every channel).
        compression: ``"lzf"``/``"gzip"`` applied when the cache is finalised, or None.
        existing: what the run would do with the files already at its destination (refuse,
            resume, replace or, with ``force``, delete them), in one line; None when it would
            start a new cache or nobody looked (``featlab.cache.files.outlook``).
    """

    points: tuple[PointPlan, ...]
    num_samples: int
    input_size: tuple[int, int]
    dtype: str
    max_size: int
    save_images: bool
    batch_size: int
    label_bytes_per_sample: int
    image_bytes_per_sample: int
    other_bytes_per_sample: int
    bytes_per_sample: int
    total_bytes: int
    host_bytes: int
    device_bytes: int = 0
    weight_bytes: int = 0
    free_bytes: int | None = None
    max_channels: int = 0
    compression: str | None = None
    existing: str | None = None

    @property
    def disk_bytes(self) -> int:
        """The most the disk holds during the run: the cache, and with ``compression`` also its
        compressed copy while finalising (at most as large again)."""
        return self.total_bytes * (1 if self.compression is None else 2)

    @property
    def fits(self) -> bool:
        """True when the free space is unknown or holds :attr:`disk_bytes`."""
        return self.free_bytes is None or self.disk_bytes <= self.free_bytes

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["points"] = [p.to_dict() for p in self.points]
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExtractPlan:
        check_record(cls, d)
        d = dict(d)
        d["points"] = tuple(PointPlan.from_dict(p) for p in d["points"])
        d["input_size"] = tuple(d["input_size"])
        return cls(**d)


def plan_extract(points: Sequence[Any], num_samples: int, input_size: int | Sequence[int], *,
                 dtype: str = "float16", max_size: int | None = None,
                 max_channels: int | None = None, compression: str | None = None,
                 save_images: bool = False,
                 batch_size: int = 32, queue_size: int = 2, num_workers: int = 0,
                 prefetch_factor: int = 2, device: str = "cpu", id_bytes: int = 32,
                 weight_bytes: int = 0, free_bytes: int | None = None,
                 forward_points: Sequence[Any] | None = None) -> ExtractPlan:
    """Estimate what extracting ``points`` over ``num_samples`` samples stores and holds in memory.

    Args:
        points: :class:`~featlab.points.SkipPoint` records measured at ``input_size``.
        num_samples: N (after ``limit``).
        input_size: side or ``(H, W)`` of the network input.
        dtype: ``"float16"`` or ``"float32"``.
        max_size: pool each point to at most this many cells per side (None/0: no pooling).
        max_channels: store at most this many channels of each point (None/0: all of them;
            which ones: :func:`channel_subset`).
        compression: ``"lzf"`` or ``"gzip"`` when finalising (None: uncompressed).
        save_images: also store the input images (uint8).
        batch_size: samples per forward.
        queue_size: batches that may wait for the writer thread.
        num_workers, prefetch_factor: the data loader's (its prefetched batches live in memory).
        device: ``"cpu"`` adds the forward's activations to the host estimate; any other
            device type gets them in ``device_bytes``.
        id_bytes: bytes of the longest sample id (fixed-length strings).
        weight_bytes: parameters and buffers of the model (device memory on a GPU).
        free_bytes: free disk space, if measured (see :func:`free_disk_bytes`).
        forward_points: every skip point the forward runs through, up to the deepest of
            ``points`` (default ``points``): the widest of them sizes the forward's memory.

    Returns:
        An :class:`ExtractPlan`.
    """
    dtype = check_dtype(dtype)
    max_size = check_max_size(max_size)
    max_channels = check_max_channels(max_channels)
    compression = check_compression(compression)
    for name, value in (("num_samples", num_samples), ("batch_size", batch_size),
                        ("queue_size", queue_size), ("num_workers", num_workers)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (
                1 if name in ("batch_size", "queue_size") else 0):
            raise ConfigError(f"`{name}` must be an int >= "
                              f"{1 if name in ('batch_size', 'queue_size') else 0}; got {value!r}.")
    h, w = (input_size, input_size) if isinstance(input_size, int) else map(int, input_size)
    item = DTYPES[dtype]
    rows = []
    for p in points:
        sh, sw = stored_size(p.size, max_size)
        c = min(p.channels, max_channels or p.channels)
        per = c * sh * sw * item
        rows.append(PointPlan(p.name, p.channels, tuple(p.size), (sh, sw), p.stride,
                              "none" if (sh, sw) == tuple(p.size) else "area", per,
                              chunk_rows(per, max(1, num_samples), batch_size),
                              per * num_samples, c))
    label = h * w
    image = 3 * h * w if save_images else 0
    other = id_bytes + 8 + 1 + _STATS_BYTES * len(rows)
    per_sample = sum(r.bytes_per_sample for r in rows) + label + image + other
    # superblock, headers, attributes (the session records' fixed size among them), chunk indexes
    metadata = 64 * 1024 + sum(SESSION_ATTR_BYTES.values()) + 4096 * len(rows)
    chunks = sum(math.ceil(num_samples / r.chunk_rows) for r in rows)
    total = per_sample * num_samples + metadata + 48 * chunks
    on_cpu = device == "cpu"
    slots = max_slots(queue_size, cuda=not on_cpu)  # each a full set of stored arrays
    arrays = [r.bytes_per_sample for r in rows] + [label, image, _STATS_BYTES * len(rows)]
    # a GPU's pinned buffers: torch's host allocator rounds each up to a power of two
    slot = sum(batch_size * b if on_cpu else _pow2(batch_size * b) for b in arrays if b)
    loader = (max(1, num_workers * prefetch_factor) + 1) * h * w * _INPUT_BYTES
    # float32 activations of the widest layer the forward passes, a few alive at a time
    forward = 3 * 4 * max((p.channels * p.size[0] * p.size[1]
                           for p in (points if forward_points is None else forward_points)),
                          default=0)
    host = slots * slot + batch_size * ((forward if on_cpu else 0) + loader)
    # on a GPU: the weights, the forward, and one point's stored copy before it goes to the host
    copy = max((r.bytes_per_sample for r in rows), default=0)
    gpu = 0 if on_cpu else weight_bytes + batch_size * (forward + copy)
    return ExtractPlan(tuple(rows), num_samples, (h, w), dtype, max_size, bool(save_images),
                       batch_size, label, image, other, per_sample, total, host,
                       device_bytes=gpu, weight_bytes=weight_bytes, free_bytes=free_bytes,
                       max_channels=max_channels, compression=compression)


def max_slots(queue_size: int, cuda: bool) -> int:
    """Batches of host buffers in flight at most (the stream makes them as needed): the queue,
    the batch being filled, the one being written, and on a GPU the one whose copies are
    synchronised one batch late."""
    return queue_size + 2 + int(cuda)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_dtype(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}. Fix: "
                          "float16 halves the size (its rounding error is recorded per sample).")
    return name


def check_error_stat(error_stat: Any) -> str:
    if error_stat not in ERROR_STATS:
        raise ConfigError(f"`error_stat` must be one of {', '.join(ERROR_STATS)}; got "
                          f"{error_stat!r}. Fix: 'bound' (half the float16 spacing at the largest "
                          "stored value) or 'exact' (max |x - stored|, slower on the CPU).")
    return error_stat


def check_compression(compression: Any) -> str | None:
    if compression in (None, "none"):
        return None
    if compression not in COMPRESSIONS:
        raise ConfigError(f"`compression` must be one of none, {', '.join(COMPRESSIONS)}; got "
                          f"{compression!r}. Fix: 'lzf' (fast, in every h5py) or 'gzip' (smaller, "
                          "readable by any HDF5 tool).")
    return compression


def check_max_size(max_size: Any) -> int:
    return _optional_bound("max_size", max_size, "cells per side", 32)


def check_max_channels(max_channels: Any) -> int:
    return _optional_bound("max_channels", max_channels, "channels per point", 256)


def _optional_bound(name: str, value: Any, unit: str, example: int) -> int:
    """``value`` as a bound: None is 0 (no bound), else a non-negative int."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"`{name}` ({flag}) must be an int >= 0 ({unit}; 0 or None: no "
                          f"bound); got {value!r}. Fix: e.g. {flag} {example} ({name}={example}).")
    return value


def free_disk_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the file system that holds ``path`` (or its nearest existing parent)."""
    folder = os.path.abspath(os.fspath(path))
    while not os.path.exists(folder):
        parent = os.path.dirname(folder)
        if parent == folder:
            break
        folder = parent
    return shutil.disk_usage(folder).free


def format_bytes(n: float) -> str:
    """Human-readable size with binary units.

    Examples:
        >>> format_bytes(512), format_bytes(3 * 2**20), format_bytes(1.5 * 2**30)
        ('512 B', '3.0 MiB', '1.50 GiB')
    """
    if n < 1024:
        return f"{int(n)} B"
    for unit, scale in (("KiB", 2**10), ("MiB", 2**20), ("GiB", 2**30), ("TiB", 2**40)):
        if n < 1024 * scale or unit == "TiB":
            value = n / scale
            return f"{value:.2f} {unit}" if unit in ("GiB", "TiB") else f"{value:.1f} {unit}"
    raise AssertionError("unreachable")
