"""Read featlab activation caches: ``open_cache``, lazy per-point arrays, batches, joins.

A :class:`CacheReader` takes a snapshot of the cache when it is opened: the metadata, the
skip-point records, and which samples are flagged ``written``. It exposes exactly those samples,
in file order, so an in-progress cache (``<path>.partial``) or a distributed one whose shards
finish out of order reads like a smaller complete one (reader row ``i`` is file row
``cache.rows[i]``); :meth:`CacheReader.refresh` takes a new snapshot. Arrays are read lazily,
only the rows asked for, through an HDF5 handle opened on first use in each process (the reader
pickles without it), so a reader can be handed to ``DataLoader`` workers under fork or spawn.

Examples:
    >>> import featlab  # doctest: +SKIP
    >>> cache = featlab.open_cache("val.h5")  # doctest: +SKIP
    >>> cache["layer3"].shape, cache["layer3"][[4, 0]].shape  # doctest: +SKIP
    ((500, 256, 8, 8), (2, 256, 8, 8))
    >>> for batch in cache.batches(["layer3"], batch_size=64):  # doctest: +SKIP
    ...     x, y, ids = batch["layer3"], batch["labels"], batch["ids"]
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from featlab._point import SkipPoint
from featlab.cache import schema
from featlab.cache._reading import (PointNotInCacheError, ids_sha256, open_cache_file,
                                    read_ids, read_rows, read_snapshot, resolve_cache_path)
from featlab.cache.arrays import CacheArray
from featlab.cache.joins import check_same_samples
from featlab.errors import (CacheError, ConfigError, FeatlabWarning, SkipPointNotFoundError,
                            did_you_mean)
from featlab.selection import select_points

if TYPE_CHECKING:  # torch is imported where tensors are made: inspecting a cache needs none
    import torch

logger = logging.getLogger("featlab")

__all__ = ["open_cache", "CacheReader", "CacheArray", "check_same_samples", "ids_sha256",
           "PointNotInCacheError"]

_CHUNKS_CACHED = 4  # chunks of the largest point kept in HDF5's per-dataset chunk cache (R-13.1)
_MIN_RDCC_BYTES = 1 << 20  # HDF5's default
_RDCC_NSLOTS = 10007  # a prime well above the number of chunks that fit (HDF5's advice)
_BATCH_KEYS = ("ids", "rows", "index", "labels", "images")  # keys next to point names


def open_cache(path: str | os.PathLike, *, allow_partial: bool = True,
               rdcc_nbytes: int | None = None) -> CacheReader:
    """Open a featlab activation cache for reading (finished or still being written).

    Args:
        path: the cache file. When it does not exist yet but ``<path>.partial`` does (an
            extraction in progress or interrupted), that file is opened; a ``.partial`` path
            may also be given directly.
        allow_partial: when False, refuse a cache that is not finished.
        rdcc_nbytes: HDF5 chunk-cache bytes per dataset; default: 4 chunks of the largest
            point (so reading the samples of one chunk one by one reads it from disk once),
            and 0 while the cache is in progress (a cached chunk could hold rows written
            later).

    Returns:
        A reader over the samples flagged ``written`` when it was opened.

    Raises:
        CacheError: no such file (the message names a ``.partial`` or shard folder if one
            exists), not an HDF5 file, not a featlab cache, an unsupported schema version, a
            damaged layout, or a shard file of a distributed cache is missing.

    Examples:
        >>> cache = open_cache("val.h5")  # doctest: +SKIP
        >>> len(cache), cache.complete, [p.name for p in cache.points]  # doctest: +SKIP
        (500, True, ['layer1', 'layer2', 'layer3', 'layer4'])
    """
    return CacheReader(resolve_cache_path(path, allow_partial=allow_partial),
                       rdcc_nbytes=rdcc_nbytes)


class CacheReader:
    """A snapshot view of one cache: metadata, points, and the samples written when opened.

    Use :func:`open_cache` to make one. ``len(cache)`` is the number of samples it exposes;
    ``cache[name]`` is the lazy ``[n, C, h, w]`` array of a point; ``cache.labels`` and
    ``cache.images`` likewise. Metadata attributes (``model``, ``data``, ``classes``, ...) are
    the decoded root attributes of the file (None when one is missing; ``featlab verify``
    reports that).
    """

    __iter__ = None  # not a sequence of samples: iterate cache.batches(...) or cache.points

    def __init__(self, path: Path, *, rdcc_nbytes: int | None = None):
        self.path = Path(path)
        self._rdcc_request = rdcc_nbytes
        self._file = None
        self._pid: int | None = None
        self._dsets: dict = {}
        self._load(first=True)

    # ---- snapshot -------------------------------------------------------------------------
    def _load(self, first: bool) -> None:
        snap = read_snapshot(self.path)
        path, attrs, rows = snap.path, snap.attrs, snap.rows
        identity = (attrs.get("ids_sha256"), [p.name for p in snap.points], snap.num_samples)
        if not first and identity != self._identity:
            raise CacheError(f"a cache must keep its samples and points while it is read; "
                             f"{str(path)!r} was replaced by another cache since it was opened. "
                             "Fix: open_cache() it again.")
        if first and attrs.get("complete") and len(rows) != snap.num_samples:
            warnings.warn(f"{path} is marked complete but only {len(rows)} of "
                          f"{snap.num_samples} samples are flagged written; reading those. Fix: "
                          f"run `featlab verify {path}`.", FeatlabWarning, stacklevel=4)
        self.path, self.attrs, self._identity = path, attrs, identity
        self.schema_version = snap.schema_version
        self._rows, self._ids = rows, [snap.ids[r] for r in rows]
        self._index, self._points, self._stored = snap.index[rows], snap.points, snap.stored
        self._channels = snap.channels
        self._arrays = snap.arrays
        # HDF5 shares one open file per process, chunk caches included: a chunk cached by any
        # handle while some of its rows were unwritten would be served stale to every reader.
        # While the file is in progress no chunk is cached (uncompressed chunks are then read
        # straight from disk, only the rows asked for).
        partial = path.name.endswith(schema.PARTIAL_SUFFIX)
        self._rdcc_nbytes = self._rdcc_request if self._rdcc_request is not None else (
            0 if partial else max(_MIN_RDCC_BYTES, _CHUNKS_CACHED * snap.largest_chunk))

    def refresh(self) -> None:
        """Take a new snapshot: pick up samples written since opening (and a finished rename).

        The HDF5 handle is reopened. HDF5 shares one open file per process: a plain
        ``h5py.File`` on the same in-progress file kept open elsewhere in this process can
        keep serving data it read before (close it too).
        """
        self.close()
        before = len(self)
        self._load(first=False)
        logger.debug("refreshed %s: %d -> %d samples", self.path, before, len(self))

    # ---- HDF5 handle, per process ---------------------------------------------------------
    def _h5(self):
        if self._file is None or self._pid != os.getpid():
            # After fork the inherited handle belongs to the parent: never read through it.
            self._file, self._dsets = None, {}
            _, self._file = open_cache_file(self.path, rdcc_nbytes=self._rdcc_nbytes,
                                            rdcc_nslots=_RDCC_NSLOTS)
            self._pid = os.getpid()
        return self._file

    def _dataset(self, name: str):
        f = self._h5()
        if name not in self._dsets:
            self._dsets[name] = f[name]
        return self._dsets[name]

    def close(self) -> None:
        """Close the HDF5 handle of this process (it reopens on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file, self._pid, self._dsets = None, None, {}

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.update(_file=None, _pid=None, _dsets={})  # h5py handles do not pickle
        return state

    # ---- samples and points ---------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def points(self) -> list[SkipPoint]:
        """The stored skip-point records, in execution order."""
        return list(self._points)

    @property
    def point_names(self) -> list[str]:
        return [p.name for p in self._points]

    def point(self, name: str) -> SkipPoint:
        """The record of one stored point."""
        return self._points[self._position(name)]

    def stored_size(self, name: str) -> tuple[int, int]:
        """``(h, w)`` stored for a point (its ``size`` unless pooled above ``max_size``)."""
        return self._stored[self.point(name).name]

    def stored_channels(self, name: str) -> np.ndarray:
        """The network channels stored for a point, in order: ``arange(C)``, or the subset
        kept with ``max_channels`` (the ``channels`` attribute of its dataset)."""
        return np.asarray(self._channels[self.point(name).name], dtype=np.int64)

    @property
    def ids(self) -> list[str]:
        """Sample ids of the exposed samples, in order."""
        return list(self._ids)

    @property
    def index(self) -> np.ndarray:
        """Data-set index of each exposed sample."""
        return self._index.copy()

    @property
    def rows(self) -> np.ndarray:
        """File row of each exposed sample (reader row ``i`` is file row ``rows[i]``)."""
        return self._rows.copy()

    def all_ids(self) -> list[str]:
        """Every sample id the cache is meant to hold (written or not), read from the file."""
        return read_ids(self._dataset(schema.IDS))

    def __contains__(self, name) -> bool:
        return isinstance(name, (str, SkipPoint)) and self._find(name) is not None

    def __getitem__(self, name: str | SkipPoint) -> CacheArray:
        return CacheArray(self, f"{schema.POINTS}/{self.point(name).name}")

    @property
    def labels(self) -> CacheArray:
        """Lazy ``[n, H, W]`` uint8 class indices (``ignore_index`` = ignored)."""
        return CacheArray(self, schema.LABELS)

    @property
    def has_images(self) -> bool:
        return schema.IMAGES in self._arrays

    @property
    def images(self) -> CacheArray:
        """Lazy ``[n, 3, H, W]`` uint8 input images (only if extracted with ``save_images``)."""
        self._require_images()
        return CacheArray(self, schema.IMAGES)

    @property
    def nonfinite(self) -> CacheArray:
        """Lazy ``[n, P]`` count of NaN/Inf per sample and point (columns = ``point_names``)."""
        return CacheArray(self, schema.NONFINITE)

    @property
    def abs_error(self) -> CacheArray:
        """Lazy ``[n, P]`` max storage rounding error per sample and point."""
        return CacheArray(self, schema.ABS_ERROR)

    def _find(self, name) -> int | None:
        """Position of a stored point by name, or by an alias recorded with it (``"layer3"``
        for ``"layer3.1"``: an outer module returning the same tensor)."""
        name = name.name if isinstance(name, SkipPoint) else name
        return next((i for i, p in enumerate(self._points) if name in (p.name, *p.aliases)),
                    None)

    def _position(self, name) -> int:
        i = self._find(name)
        if i is None:
            raise self._unknown(name.name if isinstance(name, SkipPoint) else str(name))
        return i

    def _unknown(self, token: str) -> PointNotInCacheError:
        names = self.point_names
        listed = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        return PointNotInCacheError(
            f"points must name points stored in {str(self.path)!r}; got {token!r}, which matches "
            f"none.{did_you_mean(token, names)} Fix: choose from {listed} (see `featlab inspect "
            f"{self.path}`), or re-extract with that point.")

    def select(self, points: str | Sequence[str | SkipPoint] | None = None) -> list[str]:
        """Names of stored points chosen by a selection, in execution order.

        ``None`` or ``"all"`` selects every point; otherwise names, globs (``"layer3.*"``),
        ``"re:<regex>"`` and ``"stages"`` as in :func:`featlab.select_points`.
        """
        if points is None:
            return self.point_names
        if isinstance(points, SkipPoint):
            points = [points]
        if not isinstance(points, str) and isinstance(points, Sequence):
            points = [p.name if isinstance(p, SkipPoint) else p for p in points]
        try:
            return [p.name for p in select_points(self._points, points)]
        except SkipPointNotFoundError:
            tokens = points.split(",") if isinstance(points, str) else points
            for token in (t.strip() for t in tokens):
                try:
                    select_points(self._points, token)
                except SkipPointNotFoundError:
                    raise self._unknown(token) from None
            raise

    # ---- reading ---------------------------------------------------------------------------
    def _require_images(self) -> None:
        if not self.has_images:
            raise ConfigError(f"images must be stored in the cache to read them; "
                              f"{str(self.path)!r} has no /{schema.IMAGES}. Fix: re-extract "
                              "with save_images=True, or pass images=False.")

    def _read(self, rows: np.ndarray, names: Sequence[str], labels: bool, images: bool
              ) -> dict[str, np.ndarray]:
        """Arrays of file ``rows`` (any order) for the points ``names`` and the options."""
        out = {n: read_rows(self._dataset(f"{schema.POINTS}/{n}"), rows) for n in names}
        if labels:
            out["labels"] = read_rows(self._dataset(schema.LABELS), rows)
        if images:
            out["images"] = read_rows(self._dataset(schema.IMAGES), rows)
        return out

    def _batch_names(self, points, images: bool) -> list[str]:
        names = self.select(points)
        clash = sorted(set(names) & set(_BATCH_KEYS))
        if clash:
            raise ConfigError(f"batch keys must be unambiguous; points {clash} share names with "
                              f"the keys {list(_BATCH_KEYS)}. Fix: read them with cache[name].")
        if images:
            self._require_images()
        return names

    def batches(self, points: str | Sequence[str | SkipPoint] | None = None,
                batch_size: int = 32, *, labels: bool = True, images: bool = False,
                tensors: bool = False) -> Iterator[dict]:
        """Iterate over the exposed samples in order, ``batch_size`` at a time.

        Args:
            points: the points to read (a selection as in :meth:`select`; None = all).
            batch_size: samples per batch (the last batch may be smaller).
            labels: include ``"labels"`` ``[b, H, W]``.
            images: include ``"images"`` ``[b, 3, H, W]`` (the cache must store them).
            tensors: torch tensors instead of numpy arrays.

        Yields:
            Dicts with ``"ids"`` (list of str), ``"rows"`` (reader rows), ``"index"`` (data-set
            indices), one ``[b, C, h, w]`` array per point name, and the optional arrays.

        Examples:
            >>> for b in cache.batches("layer3", batch_size=64):  # doctest: +SKIP
            ...     b["layer3"].shape, b["labels"].shape, b["ids"][:2]
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1; got {batch_size!r}. Fix: e.g. 32.")
        names = self._batch_names(points, images)
        rows, ids, index = self._rows, self._ids, self._index  # this snapshot, even if refreshed
        for start in range(0, len(rows), batch_size):
            pos = np.arange(start, min(start + batch_size, len(rows)))
            batch = {"ids": ids[start:start + batch_size], "rows": pos, "index": index[pos]}
            data = self._read(rows[pos], names, labels, images)
            if tensors:
                import torch

                batch = {**batch, "rows": torch.from_numpy(pos), "index": torch.from_numpy(
                    batch["index"])}
                data = {k: torch.from_numpy(v) for k, v in data.items()}
            yield batch | data

    def dataset(self, points: str | Sequence[str | SkipPoint] | None = None, *,
                labels: bool = True, images: bool = False, dtype: torch.dtype | None = None):
        """A ``torch.utils.data.Dataset`` over the exposed samples (for ``DataLoader``).

        Items are dicts: ``"id"``, ``"index"``, ``"row"``, one ``[C, h, w]`` tensor per point
        (cast to ``dtype`` if given), ``"labels"`` ``[H, W]`` uint8, ``"images"`` uint8. It
        pickles without HDF5 handles and reopens the file in each worker process.

        Examples:
            >>> ds = cache.dataset(["layer3"], dtype=torch.float32)  # doctest: +SKIP
            >>> loader = torch.utils.data.DataLoader(  # doctest: +SKIP
            ...     ds, batch_size=16, num_workers=2)
        """
        from featlab.cache.dataset import CacheDataset  # torch Dataset view, kept apart

        return CacheDataset(self, self._batch_names(points, images), labels=labels,
                            images=images, dtype=dtype)

    # ---- metadata --------------------------------------------------------------------------
    complete = property(lambda self: bool(self.attrs.get("complete", False)),
                        doc="The file's ``complete`` attribute (the writer finished).")
    num_samples = property(lambda self: int(self.attrs["num_samples"]),
                           doc="N: samples the cache is meant to hold, written or not.")
    model = property(lambda self: self.attrs.get("model"), doc="BackboneSpec record (dict).")
    data = property(lambda self: self.attrs.get("data"), doc="Data set settings (dict).")
    classes = property(lambda self: tuple(self.attrs.get("classes") or ()), doc="Class names.")
    ignore_index = property(lambda self: self.attrs.get("ignore_index"))
    input_size = property(lambda self: tuple(self.attrs.get("input_size") or ()),
                          doc="(H, W) of the network input.")
    dtype = property(lambda self: self.attrs.get("dtype"), doc="Storage dtype of the points.")
    max_size = property(lambda self: self.attrs.get("max_size"))
    settings = property(lambda self: self.attrs.get("settings"))
    versions = property(lambda self: self.attrs.get("versions"))
    runtime = property(lambda self: self.attrs.get("runtime"))
    created = property(lambda self: self.attrs.get("created"))
    finished = property(lambda self: self.attrs.get("finished"),
                        doc="The session that finalised each file: rank, rows it computed of the "
                            "file's, time, device, versions (None for caches before it).")
    resumed = property(lambda self: self.attrs.get("resumed"),
                       doc="Each session that resumed a partial file, in order: rank, rows already "
                           "written when it began (``skipped``) of the file's, time, device, "
                           "versions (None when no session resumed it).")

    def identity(self) -> dict:
        """What identifies this cache in a result or run record: its absolute path, samples,
        the ids' fingerprint, data set and split, backbone, weights (and their hash), the hash
        of the model state the features came from, input size, dtype, and what was stored of
        each point (``max_size`` pooling, ``max_channels`` subsets and their ``channel_seed``:
        two caches that differ there give other CKA or probe values)."""
        model, data, settings = self.model or {}, self.data or {}, self.settings or {}
        return {"path": os.path.abspath(self.path), "num_samples": len(self),
                "ids_sha256": self.ids_sha256, "split": data.get("split"),
                "data": data.get("name"), "model": model.get("name"),
                "weights": model.get("weights"), "weights_sha256": model.get("weights_sha256"),
                "model_state": settings.get("model_state"), "input_size": list(self.input_size),
                "dtype": self.dtype, "max_size": settings.get("max_size"),
                "max_channels": settings.get("max_channels") or 0,  # 0: every channel
                "channel_seed": settings.get("channel_seed") or 0}
    world_size = property(lambda self: self.attrs.get("world_size"))
    ids_sha256 = property(lambda self: self.attrs.get("ids_sha256"),
                          doc="Stored fingerprint of all N sample ids.")

    def __repr__(self) -> str:
        from featlab.cache.summary import format_summary, summary

        try:
            return format_summary(summary(self))
        except OSError as err:  # the file vanished: still show what the snapshot knows
            return (f"<featlab cache {str(self.path)!r}: {len(self)} of {self.num_samples} "
                    f"samples, points {self.point_names} (unreadable now: {err})>")

    def _repr_html_(self) -> str:
        from featlab.cache.summary import summary, summary_html

        return summary_html(summary(self))
