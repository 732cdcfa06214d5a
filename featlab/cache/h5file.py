"""The HDF5 side of the writer: create a cache file, check a partial one, write rows, finalise.

Crash safety rests on one rule (see :mod:`featlab.cache.schema`): the file's metadata never
changes while samples stream in. :func:`create` makes every dataset and attribute, allocates
all storage (``ALLOC_TIME_EARLY``, ``FILL_TIME_NEVER``, fixed shapes, no time stamps), writes
ids and index, flushes and closes -- in a temporary file renamed into place, so a partial cache
always has complete metadata. :class:`RowWriter` then writes only raw data: a batch's rows,
flush, the batch's ``written`` flags, flush (point rows that line up go straight to their
chunks with ``O_DIRECT``, see :mod:`featlab.cache.direct`). A process killed at any instant
leaves flagged rows intact (a re-written chunk carries the same bytes for rows already
flagged), and a reader sees a row only after its data reached the file. Files are opened with
``locking=False`` so that readers can open a cache while it is being written. Outside the
stream, the session that resumes a partial file and the one that finishes it record themselves
in attributes made empty with a fixed size at creation, rewritten in place
(:func:`record_resume`, :func:`finalize`): the partial file's metadata never changes after it
is made, so a reader, plain h5py included, can open it at any instant.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from featlab.cache import schema as S
from featlab.cache._reading import read_root_attrs
from featlab.cache.direct import ALIGN, DirectWriter
from featlab.cache.settings import ExtractSettings
from featlab.errors import CacheError

log = logging.getLogger("featlab")

__all__ = ["FileLayout", "PointLayout", "create", "inspect", "RowWriter", "finalize",
           "copy_cache", "chunked_arrays", "write_virtual", "versions", "finished_record",
           "record_resume", "replace_durably", "Inspection"]


@dataclass(frozen=True)
class PointLayout:
    """One ``/points/<name>`` dataset: stored shape ``(C, h, w)``, chunk rows, attributes."""

    name: str
    shape: tuple[int, int, int]
    chunk_rows: int
    attrs: Mapping[str, str]


@dataclass(frozen=True)
class FileLayout:
    """Shapes and chunking of one cache file (a whole cache or one shard)."""

    num_rows: int
    input_size: tuple[int, int]
    dtype: str
    points: tuple[PointLayout, ...]
    save_images: bool
    id_length: int
    label_chunk_rows: int
    image_chunk_rows: int
    error_stat: str  # the `statistic` attribute of /stats/abs_error


def _dcpl() -> h5py.h5p.PropDCID:
    # storage allocated at creation and never filled: the chunk index (and every other piece of
    # metadata) is complete before the first sample, and writing a row changes no metadata
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    return dcpl


def _dataset(group: h5py.Group, name: str, shape: tuple[int, ...], dtype: Any,
             chunk_rows: int | None = None) -> h5py.Dataset:
    chunks = None if chunk_rows is None else (chunk_rows, *shape[1:])
    return group.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, dcpl=_dcpl(),
                                track_times=False)


def id_dtype(length: int) -> np.dtype:
    """Fixed-length UTF-8 strings of ``length`` bytes (at least 1)."""
    return h5py.string_dtype("utf-8", max(1, length))


def create(path: str, layout: FileLayout, attrs: Mapping[str, Any], ids: Sequence[str],
           index: np.ndarray) -> None:
    """Write a new cache file with every dataset and attribute, ready for rows.

    Written to ``path + ".creating"`` and renamed to ``path`` once complete, so ``path`` never
    holds half-made metadata.
    """
    tmp = path + S.CREATING_SUFFIX
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _create(tmp, layout, attrs, ids, index)
        os.replace(tmp, path)
    except OSError as err:
        raise CacheError(f"the cache file {path} must be created; it could not be ({err}). Fix: "
                         "check the folder's permissions and free space, then re-run.") from err


def _create(tmp: str, layout: FileLayout, attrs: Mapping[str, Any], ids: Sequence[str],
            index: np.ndarray) -> None:
    n = layout.num_rows
    h, w = layout.input_size
    # chunks of ALIGN bytes or more start on ALIGN boundaries: rows can be written with O_DIRECT
    with h5py.File(tmp, "w", locking=False, track_order=False, alignment_threshold=ALIGN,
                   alignment_interval=ALIGN) as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for key, size in S.SESSION_ATTR_BYTES.items():  # filled in place by the sessions
            f.attrs.create(key, b"", dtype=h5py.string_dtype("ascii", size))
        _dataset(f, S.IDS, (n,), id_dtype(layout.id_length))[...] = np.array(
            [i.encode("utf-8") for i in ids], dtype=id_dtype(layout.id_length))
        _dataset(f, S.INDEX, (n,), np.int64)[...] = np.asarray(index, np.int64)
        _dataset(f, S.WRITTEN, (n,), np.uint8)[...] = np.zeros(n, np.uint8)
        _dataset(f, S.LABELS, (n, h, w), np.uint8, layout.label_chunk_rows)
        if layout.save_images:
            _dataset(f, S.IMAGES, (n, 3, h, w), np.uint8, layout.image_chunk_rows)
        group = f.create_group(S.POINTS)
        for p in layout.points:
            dset = _dataset(group, p.name, (n, *p.shape), layout.dtype, p.chunk_rows)
            for key, value in p.attrs.items():
                dset.attrs[key] = value
        f.create_group(S.STATS)
        _dataset(f, S.NONFINITE, (n, len(layout.points)), np.int64)
        _dataset(f, S.ABS_ERROR, (n, len(layout.points)), np.float32).attrs["statistic"] = \
            layout.error_stat
        f.flush()


@dataclass(frozen=True)
class Inspection:
    """What an existing cache file holds."""

    settings: ExtractSettings
    written: np.ndarray
    complete: bool
    num_rows: int
    shapes: Mapping[str, tuple[int, ...]]


def inspect(path: str) -> Inspection:
    """Read a cache file's settings, ``written`` flags and shapes (read-only, no lock)."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("schema") != S.SCHEMA:
                raise CacheError(f"{path} must be a featlab cache (attribute schema="
                                 f"{S.SCHEMA!r}); got {f.attrs.get('schema')!r}. Fix: choose "
                                 "another --out, or --force to replace the file.")
            version = int(f.attrs.get("schema_version", -1))
            if version != S.SCHEMA_VERSION:
                raise CacheError(f"{path} must have cache schema version {S.SCHEMA_VERSION}; it "
                                 f"has {version}. Fix: --force to rebuild it with this featlab.")
            settings = ExtractSettings.from_dict(json.loads(f.attrs["settings"]))
            written = f[S.WRITTEN][...]
            shapes = {S.LABELS: f[S.LABELS].shape}
            shapes.update({f"{S.POINTS}/{k}": v.shape for k, v in f[S.POINTS].items()})
            return Inspection(settings, written, bool(f.attrs["complete"]), len(written), shapes)
    except CacheError:
        raise
    except (OSError, KeyError, ValueError) as err:
        raise CacheError(f"the partial cache at {path} must be readable to resume; it is not "
                         f"({type(err).__name__}: {str(err).splitlines()[0][:160]}). Fix: "
                         "--force to start over.") from err


class RowWriter:
    """Writes batches of rows into an open cache file (one thread only: h5py is not reentrant)."""

    def __init__(self, path: str, point_names: Sequence[str], save_images: bool):
        # no chunk cache: whole-chunk writes go straight from the caller's buffer to the file
        self.file = h5py.File(path, "r+", locking=False, rdcc_nbytes=0)
        self.points = [self.file[f"{S.POINTS}/{name}"] for name in point_names]
        self.direct = DirectWriter(path)
        self._direct = [self.direct.eligible(d) for d in self.points]
        self.labels = self.file[S.LABELS]
        self.images = self.file[S.IMAGES] if save_images else None
        self.nonfinite = self.file[S.NONFINITE]
        self.abs_error = self.file[S.ABS_ERROR]
        self.written = self.file[S.WRITTEN]

    def write(self, start: int, runs: Sequence[tuple[int, int]], points: Sequence[np.ndarray],
              labels: np.ndarray, images: np.ndarray | None, nonfinite: np.ndarray,
              abs_error: np.ndarray) -> None:
        """Write rows ``start + a .. start + b`` for each ``(a, b)`` in ``runs`` (offsets into
        the batch arrays), flush, then flag them written and flush again."""
        for a, b in runs:
            rows = slice(start + a, start + b)
            for dset, array, direct in zip(self.points, points, self._direct):
                if not (direct and self.direct.write(dset, rows.start, array[a:b])):
                    dset[rows] = array[a:b]
            self.labels[rows] = labels[a:b]
            if self.images is not None and images is not None:
                self.images[rows] = images[a:b]
            self.nonfinite[rows] = nonfinite[a:b]
            self.abs_error[rows] = abs_error[a:b]
        self.file.flush()  # the rows reach the file before any flag says they are there
        for a, b in runs:
            self.written[start + a:start + b] = np.ones(b - a, np.uint8)
        self.file.flush()

    def close(self) -> None:
        self.direct.close()
        self.file.close()


def finalize(partial: str, final: str, compression: str | None = None,
             progress: bool = False, finished: Mapping[str, Any] | None = None) -> None:
    """Mark a fully written file complete and move it to its final name, atomically and
    durably: every row is on disk before ``complete`` is set, and the rename after
    (:func:`replace_durably`).

    ``finished``: what the session that completes the file records of itself (attribute
    ``finished``, a JSON list of one record; see :func:`finished_record`).

    With ``compression`` (``"lzf"`` or ``"gzip"``, :data:`~featlab.cache.plan.COMPRESSIONS`)
    the point, label and image arrays are copied into a compressed file instead, which replaces
    ``final`` once complete; the partial file is removed after. While samples stream in the file
    stays uncompressed: a compressed chunk's size changes when it is rewritten, and with it the
    chunk index, which would break the rule that rows never change metadata. Killed during the
    copy, the same command finalises again from the partial file; stopped between the rename
    and the removal, the next extraction deletes the partial (``files.remove_finalised_partial``).
    """
    if compression is None:
        _sync(partial)  # every row on disk before the file says it is complete
    with h5py.File(partial, "r+", locking=False) as f:
        written = f[S.WRITTEN][...]
        assert written.all(), "finalize called before every row was written"
        if finished is not None:  # the compressed copy takes it with the other attributes
            _write_records(f, "finished", [dict(finished)])
        if compression is None:
            f.attrs.modify("complete", True)
    if compression is None:
        replace_durably(partial, final)
        return
    tmp = final + S.COMPRESSING_SUFFIX
    copy_cache(partial, tmp, compression, progress=progress)
    replace_durably(tmp, final)
    os.remove(partial)


def replace_durably(src: str, dst: str) -> None:
    """``os.replace(src, dst)`` of a finished cache file, with ``src`` on disk before and the
    rename after (``fsync`` of the file, then of its folder): a machine that crashes once this
    returns keeps the cache whole under ``dst``; before it, a crash leaves what was there. It
    costs ~5 ms for a 1 GB cache whose rows went to disk as they were written."""
    _sync(src)
    os.replace(src, dst)
    if os.name == "posix":  # elsewhere a folder cannot be opened to sync it
        _sync(os.path.dirname(os.path.abspath(dst)))


def _sync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # a file system that cannot sync (some FUSE mounts): as it is
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def copy_cache(src: str, dst: str, compression: str | None, *,
               chunk_rows: Mapping[str, int] | None = None, progress: bool = False,
               desc: str | None = None,
               copy: Callable[[str, h5py.Dataset, Callable[[int], Any]], bool] | None = None
               ) -> None:
    """``src`` into a new file ``dst`` marked complete, every array stored in ``dst`` itself (a
    virtual dataset is read through): the same datasets and attributes, with points, labels and
    images chunked like ``src`` (or by ``chunk_rows``, per dataset name: virtual datasets have
    no chunks) and compressed if asked (byte shuffle first: floats compress better).

    ``copy(name, out, done)``, if given, may fill the new, empty chunked dataset ``out`` itself
    (calling ``done(nbytes)`` as it goes) and return True; on False the rows are copied here."""
    from tqdm.auto import tqdm

    with h5py.File(src, "r", locking=False) as s, \
            h5py.File(dst, "w", locking=False, track_order=False) as d:
        for key, value in s.attrs.items():
            d.attrs[key] = value
        d.attrs.modify("complete", True)
        big = chunked_arrays(s)
        for name in (S.IDS, S.INDEX, S.WRITTEN, S.NONFINITE, S.ABS_ERROR):
            _with_attrs(s[name], d.create_dataset(name, data=s[name][()], dtype=s[name].dtype,
                                                  track_times=False))
        d.create_group(S.POINTS)
        total = sum(s[name].nbytes for name in big)
        with tqdm(total=total, unit="B", unit_scale=True,
                  desc=desc or f"compress ({compression})",
                  disable=not progress or os.environ.get("FEATLAB_PROGRESS") == "0") as bar:
            for name in big:
                src_set = s[name]
                rows = src_set.chunks[0] if chunk_rows is None else chunk_rows[name]
                out = _with_attrs(src_set, d.create_dataset(
                    name, shape=src_set.shape, dtype=src_set.dtype,
                    chunks=(rows, *src_set.shape[1:]), compression=compression,
                    shuffle=compression is not None and src_set.dtype.itemsize > 1,
                    track_times=False))
                if copy is not None and copy(name, out, bar.update):
                    continue
                if compression == "gzip":
                    _deflate_chunks(src_set, out, bar.update)
                    continue
                row = src_set.dtype.itemsize * int(np.prod(src_set.shape[1:]))
                step = max(1, (64 << 20) // max(1, row) // rows) * rows  # whole chunks, ~64 MB
                for start in range(0, len(src_set), step):  # none or lzf (h5py's, 1 thread)
                    block = src_set[start:start + step]
                    out[start:start + len(block)] = block
                    bar.update(block.nbytes)


def chunked_arrays(f: h5py.File) -> list[str]:
    """Names of a cache file's chunked arrays: labels, every point, images if stored."""
    return [S.LABELS, *(f"{S.POINTS}/{k}" for k in f[S.POINTS]),
            *([S.IMAGES] if S.IMAGES in f else [])]


def _with_attrs(src: h5py.Dataset, out: h5py.Dataset) -> h5py.Dataset:
    for key, value in src.attrs.items():
        out.attrs[key] = value
    return out


def _deflate_chunks(src: h5py.Dataset, out: h5py.Dataset, done: Any) -> None:
    """Copy ``src`` into ``out`` (chunked, with shuffle and gzip filters) chunk by chunk,
    shuffling and deflating the chunks on a thread pool (zlib releases the GIL) and writing them
    with ``write_direct_chunk``: h5py's own gzip runs in one thread, ~30 MB/s here."""
    import collections
    import zlib
    from concurrent.futures import ThreadPoolExecutor

    k, item = out.chunks[0], src.dtype.itemsize
    level = out.compression_opts
    tail = (0,) * (src.ndim - 1)

    def pack(block: np.ndarray) -> bytes:
        raw = block.reshape(-1).view(np.uint8)
        if item > 1:  # HDF5's shuffle filter: the first bytes of every element, then the second...
            raw = np.ascontiguousarray(raw.reshape(-1, item).T)
        return zlib.compress(raw, level)

    workers = max(1, min(8, os.cpu_count() or 1))
    pending: collections.deque = collections.deque()

    def write_oldest() -> None:
        start, nbytes, job = pending.popleft()
        out.id.write_direct_chunk((start, *tail), job.result(), 0)
        done(nbytes)

    with ThreadPoolExecutor(workers) as pool:
        for start in range(0, len(src), k):
            block = src[start:start + k]
            nbytes = block.nbytes
            if len(block) < k:  # the last chunk is stored whole, padded
                block = np.concatenate([block, np.zeros((k - len(block), *block.shape[1:]),
                                                        block.dtype)])
            pending.append((start, nbytes, pool.submit(pack, block)))
            if len(pending) > 2 * workers:
                write_oldest()
        while pending:
            write_oldest()


def read_nonfinite(path: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``(counts [N, P], ids [N], point names)`` of a cache's ``/stats/nonfinite``."""
    with h5py.File(path, "r", locking=False) as f:
        counts = f[S.NONFINITE][...]
        rows = np.flatnonzero(counts.any(axis=1))
        ids = [f[S.IDS][int(i)].decode("utf-8") for i in rows]
        return counts[rows], np.asarray(ids, dtype=object), json.loads(f.attrs["point_names"])


def write_virtual(path: str, shards: Sequence[str], rows: Sequence[int],
                  attrs: Mapping[str, Any]) -> None:
    """Write ``path``: one cache whose datasets are virtual datasets over the ``shards`` (complete
    shard files in rank order, of ``rows`` rows each, checked by
    :func:`featlab.cache.merge.check_shards`).

    Sources are named relative to ``path``'s folder, so the cache and its shards move together.
    Rows of a missing shard read as 0, so their ``written`` flag reads 0 too.
    """
    folder = os.path.dirname(os.path.abspath(path))
    with h5py.File(shards[0], "r", locking=False) as f0:
        names: list[str] = []
        f0.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                      else None)
        meta = {name: (f0[name].shape[1:], f0[name].dtype, dict(f0[name].attrs)) for name in names}
    total = sum(rows)
    with h5py.File(path, "w", locking=False) as out:
        for key, value in attrs.items():
            out.attrs[key] = value
        for name in names:
            rest, dtype, dattrs = meta[name]
            layout = h5py.VirtualLayout(shape=(total, *rest), dtype=dtype)
            start = 0
            for shard, count in zip(shards, rows):
                rel = os.path.relpath(os.path.abspath(shard), folder)
                layout[start:start + count] = h5py.VirtualSource(rel, name, shape=(count, *rest),
                                                                 dtype=dtype)
                start += count
            dset = out.create_virtual_dataset(name, layout, fillvalue=None)
            for key, value in dattrs.items():
                dset.attrs[key] = value
        out.flush()


def versions() -> dict[str, str]:
    """Versions of the software that computes and writes a cache: :func:`run_versions`' (featlab
    and its commit, torch, torchvision, numpy, python, the command line) and HDF5's."""
    from featlab.runinfo import run_versions

    made = run_versions()
    return {**{k: made[k] for k in ("featlab", "git", "torch", "torchvision")},
            "h5py": h5py.__version__, "hdf5": h5py.version.hdf5_version,
            **{k: made[k] for k in ("numpy", "python", "command")}}


def finished_record(rank: int, rows: int, of: int, device: Any) -> dict[str, Any]:
    """The ``finished`` record of the session that completes a file: its rank, the ``rows`` it
    computed of the file's ``of`` (fewer when it resumed: earlier sessions wrote the rest, as the
    file's ``versions`` and ``runtime`` record the first, ``resumed`` the others), when, its
    versions and its device."""
    return _session(rank, device, rows=int(rows), of=int(of))


def record_resume(path: str, rank: int, skipped: int, of: int, device: Any) -> None:
    """Append the record of a session that resumes the partial file ``path`` to its ``resumed``
    attribute (rank, the ``skipped`` rows already written of the file's ``of``, when, versions,
    device): with ``created``/``versions`` (the first session) and ``finished`` (the last), every
    session that computed rows of a cache is on record, also one killed before the end."""
    try:
        with h5py.File(path, "r+", locking=False) as f:
            attrs, bad = read_root_attrs(f)
            if "resumed" in bad:  # a kill interrupted its last write
                log.warning("the records of the sessions that resumed %s before this one cannot "
                            "be read (a session was killed as it recorded itself); the list "
                            "starts again with this session", path)
            records = [] if "resumed" in bad else list(attrs.get("resumed", []))
            records.append(_session(rank, device, skipped=int(skipped), of=int(of)))
            _write_records(f, "resumed", records)
    except OSError as err:
        raise CacheError(f"the partial cache {path} must be writable to resume; it is not "
                         f"({str(err).splitlines()[0][:160]}). Fix: make the file writable "
                         "(chmod u+w), or --force to start over.") from err


def _write_records(f: h5py.File, name: str, records: list[dict[str, Any]]) -> None:
    """``records`` as JSON into the root attribute ``name`` of ``f``, in place: the file's
    metadata does not change (the oldest records are dropped, with a warning, where they outgrow
    the attribute's fixed size, :data:`~featlab.cache.schema.SESSION_ATTR_BYTES`)."""
    attr = f.attrs.get_id(name) if name in f.attrs else None
    if attr is None or attr.dtype.kind != "S":  # made by a featlab before fixed-size records
        f.attrs[name] = json.dumps(records)
        return
    dropped, value = 0, json.dumps(records)
    while len(value) > attr.dtype.itemsize:
        dropped += 1
        value = json.dumps(records[dropped:])
    if dropped:
        log.warning("%s of %s keeps %d session records: the %d oldest were dropped to make room "
                    "for this session's", name, f.filename, len(records) - dropped, dropped)
    f.attrs.modify(name, value)


_COMMAND_CHARS = 2000  # longest command line a session record keeps


def _session(rank: int, device: Any, **counts: int) -> dict[str, Any]:
    import torch

    made = versions()
    command = made["command"]
    if command is not None and len(command) > _COMMAND_CHARS:  # a record stays ~3 KiB at most
        made["command"] = command[:_COMMAND_CHARS] + f" ... ({len(command)} characters)"
    return {"rank": int(rank), **counts, "time": now_iso(), "device": str(device),
            "threads": torch.get_num_threads(), "versions": made}


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).astimezone().isoformat(timespec="seconds")
