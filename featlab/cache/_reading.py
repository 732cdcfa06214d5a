"""Low-level helpers shared by the cache reader, its summary and ``verify``.

Locating a cache on disk (final name, ``.partial``, shard folder), opening it read-only without
HDF5 file locks (a writer may hold the file), checking that it is a featlab cache of a supported
schema version, decoding root attributes, resolving the source files of virtual datasets, and
reading arbitrary rows of a dataset as few contiguous hyperslabs.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from featlab._point import SkipPoint
from featlab.cache import schema
from featlab.errors import CacheError, SkipPointNotFoundError

# JSON-encoded root attributes (schema.ROOT_ATTRS, FINAL_ATTRS and RESUME_ATTRS document each)
JSON_ATTRS = ("point_names", "model", "data", "classes", "input_size", "settings", "versions",
              "runtime", "finished", "resumed")


class PointNotInCacheError(CacheError, SkipPointNotFoundError, KeyError):
    """A point name or pattern matches none of the points stored in a cache.

    It is a :class:`~featlab.errors.CacheError` (the issue's contract for cache errors), a
    :class:`~featlab.errors.SkipPointNotFoundError` (like every unknown point elsewhere in
    featlab) and a ``KeyError`` (``cache[name]`` is a lookup by key).
    """

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def ids_sha256(ids: Iterable[str]) -> str:
    """The fingerprint of a list of sample ids: sha256 of the newline-joined ids (UTF-8).

    Examples:
        >>> ids_sha256(["a", "b"])[:12]
        '7e18f737311b'
    """
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def resolve_cache_path(path: str | os.PathLike, *, allow_partial: bool = True) -> Path:
    """The file to open for the cache ``path``: itself, or ``<path>.partial`` while it is written.

    A ``.partial`` path that no longer exists but whose final file does (the writer finished and
    renamed it) resolves to the final file.

    Raises:
        CacheError: no such file; or only ``<path>.partial`` exists and ``allow_partial`` is False;
            or only the shard folder of a distributed extraction exists.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise CacheError(f"a featlab cache must be a file; {str(p)!r} is a folder. Fix: pass the "
                         "cache file (e.g. 'val.h5'), not its folder.")
    if p.exists():
        return p
    if p.name.endswith(schema.PARTIAL_SUFFIX):
        final = p.with_name(p.name[:-len(schema.PARTIAL_SUFFIX)])
        if final.is_file():
            return final
    else:
        final = p
    partial = final.with_name(final.name + schema.PARTIAL_SUFFIX)
    if partial.is_file():
        if allow_partial:
            return partial
        raise CacheError(
            f"a complete featlab cache must exist at {str(final)!r}; only {str(partial)!r} exists "
            "(an extraction is running or was interrupted). Fix: wait for it, re-run the same "
            "extract command to resume, or pass allow_partial=True to read the samples written "
            "so far.")
    shards = final.with_name(final.name + schema.SHARDS_SUFFIX)
    if shards.is_dir():
        files = sorted(shards.glob("*.h5*"))
        example = f", e.g. open_cache({str(files[0])!r})" if files else ""
        raise CacheError(
            f"a featlab cache must exist at {str(final)!r}; only the shard folder "
            f"{str(shards)!r} exists (a distributed extraction is running or stopped before rank "
            f"0 wrote the main file). Fix: finish or resume the extraction, or open one shard "
            f"file{example}.")
    raise CacheError(f"a featlab cache must exist at {str(final)!r}; no such file (nor "
                     f"{partial.name!r}). Fix: check the path, or write the cache with "
                     "featlab.extract(...) / `featlab extract`.")


def open_h5(path: Path, **rdcc) -> h5py.File:
    """Open ``path`` read-only with HDF5 file locking off (a writer may have it open)."""
    try:
        return h5py.File(path, "r", locking=False, **rdcc)
    except OSError as err:
        if "locking flag" in str(err):
            raise CacheError(f"featlab opens caches with HDF5 file locking off (a writer may hold "
                             f"them), and HDF5 cannot mix that in one process with a handle "
                             f"already open with locking; {str(path)!r} is open so. Fix: close "
                             f"that h5py.File, or open it with locking=False.") from err
        raise CacheError(f"a featlab cache must be an HDF5 file; {str(path)!r} cannot be opened "
                         f"as one ({err}). Fix: pass a cache written by featlab.extract / "
                         "`featlab extract`.") from err


def open_cache_file(path: str | os.PathLike, **rdcc) -> tuple[Path, h5py.File]:
    """The file of the cache ``path`` (:func:`resolve_cache_path`) and its :func:`open_h5`
    handle. A partial file that its writer renames between the two steps is opened under its
    final name."""
    found = resolve_cache_path(path)
    try:
        return found, open_h5(found, **rdcc)
    except CacheError:
        if found.exists() or not found.name.endswith(schema.PARTIAL_SUFFIX):
            raise
    found = resolve_cache_path(found)  # the final file now
    return found, open_h5(found, **rdcc)


def check_schema(f: h5py.File, path: Path) -> int:
    """Raise CacheError unless ``f`` is a featlab cache of the supported schema version."""
    found = decode_attr(f.attrs["schema"]) if "schema" in f.attrs else None
    if found != schema.SCHEMA or "schema_version" not in f.attrs:
        what = "no 'schema' attribute" if found is None else f"schema={found!r}"
        raise CacheError(f"a featlab cache must have the root attribute schema={schema.SCHEMA!r} "
                         f"and a schema_version; {str(path)!r} is an HDF5 file with {what}. Fix: "
                         "pass a cache written by featlab.extract / `featlab extract`.")
    version = decode_attr(f.attrs["schema_version"])
    if version != schema.SCHEMA_VERSION:
        fix = ("upgrade featlab" if isinstance(version, int) and version > schema.SCHEMA_VERSION
               else "re-extract the cache with this featlab")
        raise CacheError(f"this featlab reads cache schema version {schema.SCHEMA_VERSION}; "
                         f"{str(path)!r} has version {version!r}. Fix: {fix}.")
    return version


@dataclass(frozen=True)
class Snapshot:
    """What a reader knows of a cache file at one moment (see :func:`read_snapshot`)."""

    path: Path
    schema_version: int
    attrs: dict  # decoded root attributes
    num_samples: int
    rows: np.ndarray  # file rows flagged written, increasing
    ids: list  # all N sample ids
    index: np.ndarray  # all N data-set indices
    points: list  # SkipPoint records in point_names order
    stored: dict  # point name -> (h, w) stored
    channels: dict  # point name -> the network channels stored, in order (a tuple of ints)
    arrays: dict  # dataset name -> (shape after the sample axis, dtype)
    largest_chunk: int  # bytes of the largest chunk among the point datasets


def read_snapshot(given: str | os.PathLike) -> Snapshot:
    """Read the metadata and the ``written`` flags of the cache ``given`` (resolved and opened
    by :func:`open_cache_file`; no array data).

    Raises:
        CacheError: no such cache, not a featlab cache of this schema version, a damaged
            layout, or a missing shard file.
    """
    path, f = open_cache_file(given)
    with f:
        version = check_schema(f, path)
        attrs, bad = read_root_attrs(f)
        damaged = [k for k in ("num_samples", "point_names") if k not in attrs or k in bad]
        damaged += [n for n in (schema.IDS, schema.INDEX, schema.WRITTEN, schema.LABELS,
                                schema.POINTS) if n not in f]
        names = attrs["point_names"] if "point_names" not in damaged else []
        points, stored, channels, largest = [], {}, {}, 0
        for name in names if isinstance(names, list) else []:
            try:
                dset = f[f"{schema.POINTS}/{name}"]
                points.append(SkipPoint.from_dict(json.loads(decode_attr(
                    dset.attrs["skip_point"]))))
                stored[name] = tuple(json.loads(decode_attr(dset.attrs["stored_size"])))
                channels[name] = stored_channels(dset, points[-1].channels)
                largest = max(largest, chunk_bytes(dset, path))
            except (KeyError, TypeError, ValueError):
                damaged.append(f"{schema.POINTS}/{name} (with its attributes)")
        if damaged or not isinstance(names, list):
            raise CacheError(f"a featlab cache must have {', '.join(damaged) or 'point_names'}; "
                             f"{str(path)!r} lacks them or they are unreadable (damaged or not "
                             f"written by featlab). Fix: run `featlab verify {path}` and "
                             "re-extract the cache.")
        lost = missing_shards(f, path)
        if lost:
            raise CacheError(lost)
        try:
            written, ids, index = (f[schema.WRITTEN][()], read_ids(f[schema.IDS]),
                                   f[schema.INDEX][()])
        except OSError as err:  # what a virtual dataset reads is damaged
            raise CacheError(f"a featlab cache must be readable; reading {str(path)!r} failed "
                             f"({err}): {damage_note(f, path)}.") from None
        rows = np.flatnonzero(written == 1).astype(np.int64)
        arrays = {key: (tuple(f[key].shape[1:]), f[key].dtype)
                  for key in (schema.LABELS, schema.IMAGES, schema.NONFINITE, schema.ABS_ERROR,
                              *(f"{schema.POINTS}/{n}" for n in names)) if key in f}
        return Snapshot(path, version, attrs, int(attrs["num_samples"]), rows,
                        ids, index.astype(np.int64), points,
                        stored, channels, arrays, largest)


def stored_channels(dset, channels: int) -> tuple[int, ...]:
    """The network channels a point dataset stores: its ``channels`` attribute (a JSON list,
    written with ``max_channels``), else all ``channels`` of the point."""
    if "channels" not in dset.attrs:
        return tuple(range(channels))
    return tuple(int(c) for c in json.loads(decode_attr(dset.attrs["channels"])))


def decode_attr(value):
    """An HDF5 attribute value as a plain Python value (str, int, float, bool, list)."""
    if isinstance(value, (bytes, np.bytes_)):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [decode_attr(v) for v in value.tolist()] if value.ndim else decode_attr(value[()])
    return value


def read_root_attrs(f: h5py.File) -> tuple[dict, list[str]]:
    """Root attributes decoded (JSON ones parsed), and the names of those that could not be read
    or parsed (left out). An empty JSON attribute (a session record not written yet) is left out
    too."""
    attrs, bad = {}, []
    for key in f.attrs:
        try:
            value = decode_attr(f.attrs[key])
            if key in JSON_ATTRS:
                if value == "":
                    continue
                value = json.loads(value)
        except (OSError, TypeError, ValueError):  # damaged; a session record a kill tore
            bad.append(key)
            continue
        attrs[key] = value
    return attrs, bad


def read_ids(dset: h5py.Dataset) -> list[str]:
    """Sample ids (fixed-length UTF-8 bytes in the schema; variable-length also accepted)."""
    return [str(s) for s in dset.asstr()[()].tolist()]


def source_files(f: h5py.File, path: Path) -> dict[str, Path]:
    """Files that the virtual datasets of ``f`` read from, keyed by the name stored in ``f``.

    HDF5 resolves a relative source name against the virtual dataset's folder (before the
    working directory), so featlab's relative shard paths keep working when the cache moves.
    """
    found: dict[str, Path] = {}

    def visit(_name, obj):
        if isinstance(obj, h5py.Dataset) and obj.is_virtual:
            for vmap in obj.virtual_sources():
                if vmap.file_name != "." and vmap.file_name not in found:
                    src = Path(vmap.file_name)
                    found[vmap.file_name] = src if src.is_absolute() else path.parent / src

    f.visititems(visit)
    return found


def missing_shards(f: h5py.File, path: Path) -> str | None:
    """The error for a cache whose virtual datasets read from missing files (None: none is)."""
    lost = [p for p in source_files(f, path).values() if not p.is_file()]
    if not lost:
        return None
    # named as the file was written: a renamed cache still reads its old folder
    folders = sorted({os.path.relpath(p.parent, path.parent) for p in lost})
    return (f"every shard file of a distributed cache must exist; {str(path)!r} reads from "
            f"missing {[str(p) for p in lost]}. Fix: put the shards back in "
            f"{', '.join(map(repr, folders))} next to it (its name when extracted), or join them "
            "anew with `featlab merge SHARDS --out CACHE`, or re-extract.")


def unreadable_sources(f: h5py.File, path: Path) -> list[str]:
    """The files the virtual datasets of ``f`` read from that HDF5 cannot open (a truncated or
    damaged shard); missing ones are not counted."""
    bad = []
    for src in source_files(f, path).values():
        if src.is_file():
            try:
                h5py.File(src, "r", locking=False).close()
            except OSError:
                bad.append(str(src))
    return bad


def damage_note(f: h5py.File, path: Path) -> str:
    """What to say of a cache whose arrays could not be read: which file, and the fix."""
    bad = unreadable_sources(f, path)
    if not bad:
        return ("the file is damaged or truncated. Fix: re-extract it (--force), or restore it "
                "from a copy")
    shards, them = ("its shard", "it") if len(bad) == 1 else ("its shards", "them")
    return (f"{shards} {', '.join(bad)} cannot be opened. Fix: restore {them}; or delete {them} "
            f"and {path.name}, and re-run the same torchrun extraction, which keeps the other "
            "shards; or re-extract")


def storage_bytes(dset: h5py.Dataset, base: Path) -> int:
    """Bytes a dataset occupies on disk; for a virtual dataset, the sum over its sources."""
    if not dset.is_virtual:
        return int(dset.id.get_storage_size())
    total = 0
    for vmap in dset.virtual_sources():
        src = Path(vmap.file_name)
        src = src if src.is_absolute() else base.parent / src
        if vmap.file_name == ".":
            total += int(dset.file[vmap.dset_name].id.get_storage_size())
        elif src.is_file():
            with h5py.File(src, "r", locking=False) as sf:
                if vmap.dset_name in sf:
                    total += int(sf[vmap.dset_name].id.get_storage_size())
    return total


def chunk_bytes(dset: h5py.Dataset, base: Path) -> int:
    """Bytes of one chunk of ``dset`` (of its first source if virtual; one row if contiguous)."""
    chunks = dset.chunks
    if chunks is None and dset.is_virtual:
        for vmap in dset.virtual_sources():
            src = Path(vmap.file_name)
            src = src if src.is_absolute() else base.parent / src
            if src.is_file():
                with h5py.File(src, "r", locking=False) as sf:
                    chunks = sf[vmap.dset_name].chunks if vmap.dset_name in sf else None
            break
    if chunks is None:
        chunks = (1, *dset.shape[1:])
    return int(np.prod(chunks)) * dset.dtype.itemsize


def split_key(key, n: int) -> tuple[np.ndarray, bool, tuple]:
    """Split an index over an ``n``-row array into (row positions, drop-first-axis, rest).

    The first axis takes an int, a slice, a 1-D int array (any order, repeats allowed, negative
    from the end) or a boolean mask of length ``n``; the rest of a tuple key goes to h5py as is.
    Errors are ``IndexError`` as for any Python sequence (iteration relies on it).

    Examples:
        >>> split_key(-1, 5)
        (array([4]), True, ())
        >>> split_key((slice(1, 5, 2), 0), 5)
        (array([1, 3]), False, (0,))
        >>> split_key([3, 0, 3], 5)[0]
        array([3, 0, 3])
        >>> split_key(np.array([True, False, True, False, False]), 5)[0]
        array([0, 2])
    """
    first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, ())
    if isinstance(key, tuple) and not key or first is Ellipsis:
        if rest:
            raise IndexError("cache arrays take an index for the sample axis first; got `...` "
                             "followed by more indices. Fix: write arr[:, ...].")
        return np.arange(n), False, ()
    if isinstance(first, (int, np.integer)) and not isinstance(first, (bool, np.bool_)):
        i = int(first)
        if not -n <= i < n:
            raise IndexError(f"sample index must be in [-{n}, {n}); got {i}.")
        return np.array([i % n]), True, rest
    if isinstance(first, slice):
        return np.arange(n)[first], False, rest
    arr = np.asarray(first)
    if arr.dtype == bool:
        if arr.shape != (n,):
            raise IndexError(f"a boolean mask over samples must have shape ({n},); got "
                             f"{arr.shape}.")
        return np.flatnonzero(arr), False, rest
    if arr.size == 0 and arr.ndim == 1:
        return np.zeros(0, np.int64), False, rest
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise IndexError(f"the sample index must be an int, a slice, a 1-D int array or a "
                         f"boolean mask; got {type(first).__name__} {arr.dtype} {arr.shape}.")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < -n or arr.max() >= n):
        raise IndexError(f"sample indices must be in [-{n}, {n}); got {arr.min()}..{arr.max()}.")
    return np.where(arr < 0, arr + n, arr), False, rest


def read_rows(dset: h5py.Dataset, rows: np.ndarray, rest: Sequence = ()) -> np.ndarray:
    """Read file rows ``rows`` (any order, repeats allowed) of ``dset`` in that order.

    Each run of consecutive rows is one hyperslab read (one contiguous read when chunks hold
    whole samples); the result is reordered in memory. h5py's own fancy indexing needs sorted,
    unique indices and selects element by element.
    """
    rest = tuple(rest)
    if len(rows) == 0:
        return dset[(slice(0, 0), *rest)]
    uniq, inverse = np.unique(rows, return_inverse=True)
    breaks = np.flatnonzero(np.diff(uniq) != 1) + 1
    parts = [dset[(slice(int(run[0]), int(run[-1]) + 1), *rest)]
             for run in np.split(uniq, breaks)]
    data = parts[0] if len(parts) == 1 else np.concatenate(parts)
    if len(uniq) != len(rows) or np.any(uniq != rows):
        data = data[inverse.reshape(-1)]
    return data
