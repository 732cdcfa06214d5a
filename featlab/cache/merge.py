"""Join the shard files of a distributed extraction into one cache (``featlab merge``).

Under ``torchrun`` each rank writes ``<out>.shards/rank-<r>-of-<K>.h5`` and rank 0 then joins
them itself with virtual datasets (:func:`assemble`), which needs every shard where rank 0 can
read it. When the ranks of several nodes wrote to node-local disks, copy the shards into one
folder and :func:`merge_shards` them. Merging also turns a sharded cache into one
self-contained file that can be moved or shared alone.

Either way the shards are first checked to be the whole of one extraction (R-13.3):
:func:`check_shards` wants them complete, written with the same settings, every rank once,
their sample ranges those of :func:`featlab.distributed.shard_range` (so together every sample
exactly once, in order), and their sample ids those the extraction recorded (``ids_sha256``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, NamedTuple

import h5py
import numpy as np

from featlab.cache import h5file
from featlab.cache import schema as S
from featlab.cache._reading import decode_attr
from featlab.cache.files import check_writable, refuse_complete, shard_path
from featlab.cache.plan import check_compression, format_bytes, free_disk_bytes
from featlab.cache.settings import ExtractSettings, ids_fingerprint
from featlab.distributed import shard_range
from featlab.errors import CacheError, ConfigError

__all__ = ["MergeResult", "Shard", "assemble", "check_shards", "find_shards", "merge_shards"]

log = logging.getLogger("featlab")


class Layout(NamedTuple):
    """How a shard stores one chunked array: rows per chunk, filters (compression, its options,
    shuffle), bytes when decoded."""

    rows: int
    filters: tuple
    nbytes: int


@dataclass(frozen=True)
class Shard:
    """One checked shard file: its rank's rows ``[start, stop)`` of the sorted samples, and the
    layout of each chunked array (:func:`featlab.cache.h5file.chunked_arrays`)."""

    path: str
    rank: int
    start: int
    stop: int
    settings: ExtractSettings
    attrs: dict
    ids: list[str]
    arrays: dict[str, Layout]


@dataclass(frozen=True)
class MergeResult:
    """What :func:`merge_shards` wrote.

    Attributes:
        path: the merged cache.
        num_samples: N.
        shards: the shard files joined, in rank order.
        virtual: True when ``path`` holds virtual datasets over the shards (no copy).
        compression: the compression of the copy (None: none, or virtual).
        bytes: size of ``path`` on disk (the shards not counted).
        seconds: time taken.
    """

    path: str
    num_samples: int
    shards: tuple[str, ...]
    virtual: bool
    compression: str | None
    bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return {**asdict(self), "shards": list(self.shards)}


def find_shards(inputs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """The shard files named by ``inputs``: shard files, folders holding them, or a cache whose
    ``<name>.shards`` folder holds them. Unfinished (``.partial``) shards are listed too, so
    that :func:`check_shards` can say which one to finish."""
    items = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not items:
        raise CacheError("merge needs at least one input; got none. Fix: name the shard files, "
                         "their folder, or the cache whose .shards folder holds them.")
    found: list[str] = []
    for item in items:
        path = os.path.abspath(os.fspath(item))
        folder = next((f for f in (path + S.SHARDS_SUFFIX, path) if os.path.isdir(f)), None)
        if folder is None:
            if not os.path.isfile(path):
                raise CacheError(f"every input of merge must exist; {path} does not. Fix: name "
                                 "the shard files, their folder, or the cache whose .shards "
                                 "folder holds them.")
            found.append(path)
            continue
        files = sorted(glob.glob(os.path.join(folder, "rank-*-of-*.h5")) +
                       glob.glob(os.path.join(folder, "rank-*-of-*.h5" + S.PARTIAL_SUFFIX)))
        if not files:
            raise CacheError(f"the folder {folder} must hold shard files (rank-R-of-K.h5); it "
                             "holds none. Fix: name the folder the shards were copied into.")
        found += files
    unique = {os.path.realpath(p): p for p in found}
    return list(unique.values())


def check_shards(paths: Sequence[str]) -> list[Shard]:
    """Read and check the shard files ``paths`` (any order); returns them in rank order.

    Raises:
        CacheError: naming the first problem and its fix: a shard unfinished or not a shard,
            shards of different extractions, a rank missing or twice, a sample range or the
            sample ids not those of the extraction.
    """
    if not paths:
        raise CacheError("merge needs the shard files of an extraction; got none. Fix: name "
                         "them, their folder, or the cache whose .shards folder holds them.")
    shards = [_read_shard(p) for p in paths]
    first = shards[0]
    for other in shards[1:]:
        diff = first.settings.difference(other.settings)
        if diff is not None:
            flag, there, here = diff
            raise CacheError(f"every shard must come from one extraction; {other.path} differs "
                             f"from {first.path} in {flag}: {there} there, {here} here. Fix: "
                             "merge the shards of one run (one torchrun command).")
    k, n = first.settings.world_size, first.settings.num_samples
    by_rank: dict[int, Shard] = {}
    for shard in shards:
        if shard.rank in by_rank:
            raise CacheError(f"each rank's shard must be given once; rank {shard.rank} is both "
                             f"{by_rank[shard.rank].path} and {shard.path}. Fix: name each "
                             "shard once (copies of a shard count twice).")
        by_rank[shard.rank] = shard
    missing = [r for r in range(k) if r not in by_rank]
    if missing:
        names = ", ".join(os.path.basename(shard_path("", r, k)) for r in missing[:4])
        folders = ", ".join(sorted({os.path.dirname(s.path) for s in shards}))
        raise CacheError(f"every rank's shard must be there; {len(missing)} of {k} missing "
                         f"({names}{', ...' if len(missing) > 4 else ''}) from {folders}. "
                         "Fix: copy every rank's shard into one "
                         "folder (ranks on other nodes wrote theirs on their disks), then "
                         "`featlab merge FOLDER --out CACHE`.")
    ordered = [by_rank[r] for r in range(k)]
    for shard in ordered:
        expected = shard_range(n, shard.rank, k)
        if (shard.start, shard.stop) != (expected.start, expected.stop):
            raise CacheError(f"shard {shard.path} must hold samples [{expected.start}, "
                             f"{expected.stop}) of {n} (rank {shard.rank} of {k}); it holds "
                             f"[{shard.start}, {shard.stop}). Fix: re-extract that rank.")
    ids = [i for shard in ordered for i in shard.ids]
    if ids_fingerprint(ids) != first.settings.ids_sha256 or len(set(ids)) != n:
        raise CacheError(f"the shards' sample ids must be the {n} distinct ids the extraction "
                         "recorded (settings.ids_sha256); they are not, so a shard was altered "
                         "or written from other data. Fix: re-extract the shards of one run.")
    return ordered


def _read_shard(path: str) -> Shard:
    fix = ("Fix: re-run the same torchrun command to finish it (finished shards are kept), "
           "then merge.")
    if path.endswith(S.PARTIAL_SUFFIX):
        raise CacheError(f"every shard must be complete; {path} is still partial. {fix}")
    try:
        f = h5py.File(path, "r", locking=False)
    except OSError as err:
        raise CacheError(f"{path} must be a readable HDF5 shard; it is not "
                         f"({str(err).splitlines()[0][:160]}). Fix: copy it again.") from err
    with f:
        attrs = dict(f.attrs)
        if attrs.get("schema") != S.SCHEMA:
            raise CacheError(f"{path} must be a featlab cache shard (attribute schema="
                             f"{S.SCHEMA!r}); got {attrs.get('schema')!r}. Fix: name only the "
                             "rank-R-of-K.h5 files of one extraction.")
        if "shard" not in attrs:
            raise CacheError(f"{path} must be a shard of a distributed extraction (root "
                             "attribute `shard`); it is a whole cache. Fix: it needs no merge: "
                             "open it with featlab.open_cache.")
        rows = json.loads(attrs["shard"])
        complete = bool(attrs.get("complete")) and bool(f[S.WRITTEN][()].all())
        index = f[S.INDEX][()]
        ids = [i.decode("utf-8") for i in f[S.IDS][()]]
        arrays = {name: Layout(f[name].chunks[0], (f[name].compression,
                                                   f[name].compression_opts, f[name].shuffle),
                               f[name].nbytes) for name in h5file.chunked_arrays(f)}
    if not complete:
        raise CacheError(f"every shard must be complete; {path} is not. {fix}")
    start, stop = int(rows["start"]), int(rows["stop"])
    if len(ids) != stop - start or not np.array_equal(index, np.arange(start, stop)):
        raise CacheError(f"shard {path} must hold the rows of its range [{start}, {stop}); its "
                         f"/index says otherwise. Fix: re-extract that rank.")
    settings = ExtractSettings.from_dict(json.loads(attrs["settings"]))
    return Shard(path, int(rows["rank"]), start, stop, settings, attrs, ids, arrays)


def _write_virtual(path: str, shards: Sequence[Shard]) -> None:
    """The joined cache as virtual datasets, with rank 0's root attributes for all N samples,
    complete."""
    attrs = {k: v for k, v in shards[0].attrs.items() if k != "shard"}
    attrs.update(num_samples=shards[0].settings.num_samples, complete=True,
                 world_size=shards[0].settings.world_size)
    for name in (*S.FINAL_ATTRS, *S.RESUME_ATTRS):  # every shard's sessions, not rank 0's alone
        attrs.pop(name, None)
        records = [r for s in shards for r in _records(s.attrs.get(name))]
        if records:
            attrs[name] = json.dumps(records)
    h5file.write_virtual(path, [s.path for s in shards], [s.stop - s.start for s in shards],
                         attrs)


def _records(value: object) -> list:
    """The session records in one shard's attribute value: none where it is absent, empty (no
    such session) or torn by a kill."""
    try:
        return json.loads(decode_attr(value) or "[]") if value is not None else []
    except ValueError:
        return []


def assemble(paths: Sequence[str], out: str) -> list[Shard]:
    """Check the shard files ``paths`` and write ``out`` as virtual datasets over them (what
    rank 0 does at the end of a ``torchrun`` extraction); returns the shards in rank order.
    Paths that do not exist count as missing ranks (ranks on other nodes without a shared
    file system)."""
    found = [p if os.path.exists(p) else p + S.PARTIAL_SUFFIX for p in paths]
    shards = check_shards([p for p in found if os.path.exists(p)])
    tmp = out + S.ASSEMBLING_SUFFIX
    try:
        _write_virtual(tmp, shards)
        h5file.replace_durably(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return shards


def merge_shards(inputs: str | os.PathLike | Iterable[str | os.PathLike],
                 out: str | os.PathLike, *, virtual: bool = False, compression: str = "same",
                 force: bool = False, progress: bool = True) -> MergeResult:
    """Join the shards of one distributed extraction into the cache ``out``.

    Args:
        inputs: shard files (``rank-R-of-K.h5``), folders holding them, or a sharded cache
            (its ``.shards`` folder is used).
        out: the cache to write; an existing file is replaced only with ``force``.
        virtual: write only a small main file of virtual datasets over the shards where they
            are (instant; the shards must stay beside it). Default: copy every array into
            ``out``, one self-contained file.
        compression: of the copy: ``"same"`` as the shards, ``"none"``, ``"lzf"`` or ``"gzip"``.
        force: replace an existing ``out``.
        progress: a progress bar while copying.

    Returns:
        A :class:`MergeResult`.

    Raises:
        CacheError: the shards are not the whole of one extraction (see :func:`check_shards`),
            ``out`` exists, or its disk cannot hold the copy.
    """
    started = time.perf_counter()
    if virtual and compression != "same":
        raise ConfigError("`--compression` needs a copy; got it with --virtual, which copies "
                          "nothing. Fix: drop one of the two.")
    out = os.path.abspath(os.fspath(out))
    paths = find_shards(inputs)
    check_writable(out)
    if os.path.realpath(out) in {os.path.realpath(p) for p in paths}:
        raise CacheError(f"`out` must not be one of the shards; got {out}. Fix: name a new "
                         "file, e.g. --out CACHE-merged.h5.")
    if os.path.exists(out) and not force:
        refuse_complete(out)
    if virtual:
        shards = assemble(paths, out)
        return _done(out, shards, True, None, started)
    shards = check_shards(paths)
    if compression == "same":
        compression = shards[0].arrays[S.LABELS].filters[0]
    compression = check_compression(compression)
    _check_disk(shards, out, compression)
    vds, tmp = out + S.ASSEMBLING_SUFFIX, out + S.MERGING_SUFFIX
    try:
        _write_virtual(vds, shards)
        h5file.copy_cache(vds, tmp, compression, chunk_rows=_chunk_rows(shards),
                          progress=progress, desc="merge", copy=partial(_copy_chunks, shards))
        h5file.replace_durably(tmp, out)
    finally:
        for leftover in (vds, tmp):
            if os.path.exists(leftover):
                os.remove(leftover)
    return _done(out, shards, False, compression, started)


def _done(out: str, shards: Sequence[Shard], virtual: bool, compression: str | None,
          started: float) -> MergeResult:
    result = MergeResult(out, shards[0].settings.num_samples, tuple(s.path for s in shards),
                         virtual, compression, os.path.getsize(out),
                         time.perf_counter() - started)
    how = ("virtual datasets over the shards" if virtual else
           f"one file, {format_bytes(result.bytes)}"
           + (f" ({compression})" if compression else ""))
    log.info("merged %d shards (%d samples) -> %s: %s in %.1f s", len(shards),
             result.num_samples, out, how, result.seconds)
    return result


def _chunk_rows(shards: Sequence[Shard]) -> dict[str, int]:
    """Rows per chunk of each chunked array in the copy: the shards' (the largest, as a shard
    smaller than a chunk has smaller chunks), at most N."""
    n = shards[0].settings.num_samples
    return {name: min(n, max(s.arrays[name].rows for s in shards)) for name in shards[0].arrays}


def _copy_chunks(shards: Sequence[Shard], name: str, out: h5py.Dataset, done: Any) -> bool:
    """Copy the shards' chunks of ``name`` into ``out`` as stored (no decoding, no
    recompression) when they line up with its chunks: the same chunk rows and filters, and
    every shard but the last a whole number of chunks. Returns False, copying nothing, when
    they do not."""
    k, tail = out.chunks[0], (0,) * (out.ndim - 1)
    filters = (out.compression, out.compression_opts, out.shuffle)
    if any((s.arrays[name].rows, s.arrays[name].filters) != (k, filters) for s in shards) or any(
            (s.stop - s.start) % k for s in shards[:-1]):
        return False
    row = out.dtype.itemsize * int(np.prod(out.shape[1:]))
    offset = 0
    for shard in shards:
        with h5py.File(shard.path, "r", locking=False) as f:
            src = f[name]
            for start in range(0, len(src), k):
                mask, data = src.id.read_direct_chunk((start, *tail))
                out.id.write_direct_chunk((offset + start, *tail), data, mask)
                done(min(k, len(src) - start) * row)
        offset += shard.stop - shard.start
    return True


def _check_disk(shards: Sequence[Shard], out: str, compression: str | None) -> None:
    """The copy needs about the shards' size (their arrays' size when it is uncompressed)."""
    need = sum(sum(a.nbytes for a in s.arrays.values()) if compression is None
               else os.path.getsize(s.path) for s in shards)
    free = free_disk_bytes(out)
    if need > free:
        raise CacheError(f"the disk at {os.path.dirname(out)} must hold the merged cache; it "
                         f"needs about {format_bytes(need)} and has {format_bytes(free)} free. "
                         "Fix: free space, choose another --out, or --virtual (no copy).")
