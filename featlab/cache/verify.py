"""``featlab verify``: read a cache once, in bounded-memory blocks, and list what is wrong (R-5.4).

Checks: metadata (schema, every root and point attribute present and decodable, ``ids_sha256``
recomputed, unique ids, ``point_names`` against ``/points`` and execution order, shard files of
a distributed cache), shapes (every dataset against ``num_samples``, each point against its
SkipPoint record, ``stored_size`` and ``pooling``, labels/images against ``input_size``),
completeness (flag values, the ``complete`` attribute against the flags and the file name) and
values of written samples (NaN/Inf recounted against ``/stats/nonfinite``, a float16 error bound
recomputed against ``/stats/abs_error``, labels in ``[0, classes) ∪ {ignore_index}``, every
chunk readable); a float16 point whose samples hold no value in float16's normal range (lost to
underflow, unless truly zero) is a note. Only a file that is not a featlab cache
raises (CacheError: the CLI's "bad input", exit 2); everything else becomes a :class:`Problem`.

Examples:
    >>> report = verify("val.h5", progress=False)  # doctest: +SKIP
    >>> report.ok, report.text().splitlines()[0]  # doctest: +SKIP
    (True, 'OK: val.h5 (complete; 500 of 500 samples written; 96.0 MiB read)')
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featlab._point import SkipPoint
from featlab.cache import schema
from featlab.cache._reading import (check_schema, damage_note, decode_attr, ids_sha256,
                                    missing_shards, open_cache_file, open_h5, read_ids,
                                    read_root_attrs, stored_channels)
from featlab.cache.summary import human_bytes

__all__ = ["verify", "VerifyReport", "Problem", "recheck_tail", "float16_underflow",
           "underflow_summary", "underflow_message"]

_BLOCK_BYTES = 64 << 20  # bytes read at a time per dataset: bounds verify's memory
_FIX_EXTRACT = "Fix: re-extract the cache (featlab.extract / `featlab extract`)."
# the root attributes a session writes into a partial file as it resumes or finishes it
_SESSION_ATTRS = {*schema.RESUME_ATTRS, *schema.FINAL_ATTRS}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a cache. ``check`` is one of metadata, files, shape, completeness,
    nonfinite, abs_error, labels, read."""

    check: str
    message: str

    def __str__(self) -> str:
        return f"[{self.check}] {self.message}"


@dataclass(frozen=True)
class VerifyReport:
    """The result of :func:`verify`: ``problems`` is empty when the cache is sound."""

    path: str
    complete: bool
    written: int
    total: int
    problems: tuple[Problem, ...] = ()
    notes: tuple[str, ...] = ()
    bytes_read: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        """A short human-readable report: one head line, one line per problem and note."""
        state = "complete" if self.complete else "not complete"
        head = "OK" if self.ok else f"{len(self.problems)} problem(s)"
        lines = [f"{head}: {self.path} ({state}; {self.written} of {self.total} samples "
                 f"written; {human_bytes(self.bytes_read)} read)"]
        lines += [f"  - {p}" for p in self.problems] + [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = text

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "complete": self.complete,
                "written": self.written, "total": self.total, "bytes_read": self.bytes_read,
                "problems": [{"check": p.check, "message": p.message} for p in self.problems],
                "notes": list(self.notes)}


def verify(path: str | os.PathLike, *, block_bytes: int = _BLOCK_BYTES,
           progress: bool = True) -> VerifyReport:
    """Check a cache (finished or ``.partial``) by reading all of it once.

    Args:
        path: the cache, resolved as by :func:`featlab.open_cache`.
        block_bytes: at most this many bytes of one dataset are in memory at a time.
        progress: show a progress bar (``FEATLAB_PROGRESS=0`` disables it).

    Returns:
        The report; ``report.ok`` is True when no problem was found.

    Raises:
        CacheError: the file is missing, not HDF5, not a featlab cache, or of an unsupported
            schema version.
    """
    path, f = open_cache_file(path)
    with f:
        check_schema(f, path)
        v = _Verifier(f, path)
        lost = missing_shards(f, path)
        if lost is not None:  # everything else would read fill values where the shards are
            v.add("files", lost)
            n = v.attrs.get("num_samples")
            v.n = n if isinstance(n, int) else 0
        else:
            try:
                v.check_metadata()
                v.check_shapes()
                v.check_completeness()
                v.scan(max(1, int(block_bytes)), progress)
            except OSError as err:  # HDF5 could not read what the file points at
                v.add("files", f"every array must be readable; reading failed ({err}): "
                               f"{damage_note(f, path)}.")
        return VerifyReport(str(path), bool(v.attrs.get("complete")), v.written, v.n or 0,
                            tuple(v.problems), tuple(v.notes), v.bytes_read)


@dataclass
class _Verifier:
    f: object
    path: object
    problems: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    bytes_read: int = 0
    n: int | None = None
    flags: np.ndarray | None = None
    written: int = 0
    ids: list | None = None
    records: dict = field(default_factory=dict)  # point name -> SkipPoint
    scannable: list = field(default_factory=list)  # point names safe to read row by row
    bound_ok: bool = False  # /stats/abs_error holds bounds that the stored values must give

    def __post_init__(self):
        self.attrs, self.bad = read_root_attrs(self.f)
        for key in self.bad:
            if key in _SESSION_ATTRS:  # a session killed as it recorded itself
                self.add("metadata", f"root attribute {key!r} must be readable JSON; it is not "
                                     "(a session was killed as it wrote it). The samples do not "
                                     "depend on it. Fix: none is needed; a session that resumes "
                                     "or finishes the cache writes it again.")
                continue
            try:
                raw = decode_attr(self.f.attrs[key])
            except OSError:
                self.add("metadata", f"root attribute {key!r} must be readable; it is not. "
                                     f"{_FIX_EXTRACT}")
            else:
                self.add("metadata", f"root attribute {key!r} must be JSON; got "
                                     f"{str(raw)[:60]!r}. {_FIX_EXTRACT}")

    def add(self, check: str, message: str) -> None:
        self.problems.append(Problem(check, message))

    def add_differences(self, check: str, rule: str, found: list, verb: str) -> None:
        """One problem for the samples in ``found`` (``(row, found here, recorded)``)."""
        if found:
            row, here, recorded = found[0]
            self.add(check, f"{rule}; {len(found)} sample(s) differ, first {self.sample(row)}: "
                            f"{here} {verb}, {recorded} recorded. {_FIX_EXTRACT}")

    def sample(self, row: int) -> str:
        return repr(self.ids[row]) if self.ids and row < len(self.ids) else f"row {row}"

    # ---- metadata --------------------------------------------------------------------------
    def check_metadata(self) -> None:
        f, attrs = self.f, self.attrs
        missing = [k for k in schema.ROOT_ATTRS if k not in attrs and k not in self.bad]
        if missing:
            self.add("metadata", f"every root attribute of schema {schema.SCHEMA_VERSION} must be "
                                 f"present; missing {missing}. {_FIX_EXTRACT}")
        n = attrs.get("num_samples")
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            self.n = n
        elif "num_samples" in attrs:
            self.add("metadata", f"num_samples must be an int >= 0; got {n!r}. {_FIX_EXTRACT}")
        needed = (schema.IDS, schema.INDEX, schema.WRITTEN, schema.LABELS, schema.POINTS,
                  schema.NONFINITE, schema.ABS_ERROR)
        absent = [f"/{k}" for k in needed if k not in f]
        if absent:
            self.add("metadata", f"every dataset of the layout must exist; missing {absent}. "
                                 f"{_FIX_EXTRACT}")
        if schema.IDS in f:
            self.check_ids()
        self.check_points()

    def check_ids(self) -> None:
        try:
            self.ids = read_ids(self.f[schema.IDS])
        except (OSError, TypeError, ValueError) as err:
            self.add("metadata", f"/ids must hold UTF-8 strings; reading them failed ({err}). "
                                 f"{_FIX_EXTRACT}")
            return
        self.bytes_read += self.f[schema.IDS].nbytes
        seen, dups = set(), []
        for s in self.ids:
            if s in seen:
                dups.append(s)
            seen.add(s)
        if dups:
            self.add("metadata", f"sample ids must be unique; {len(dups)} repeat, first "
                                 f"{dups[0]!r}. {_FIX_EXTRACT}")
        stored, actual = self.attrs.get("ids_sha256"), ids_sha256(self.ids)
        # a torchrun shard holds its rank's ids; its ids_sha256 is the whole cache's
        if stored is not None and stored != actual and "shard" not in self.attrs:
            self.add("metadata", f"ids_sha256 must be the sha256 of the newline-joined /ids; "
                                 f"stored {str(stored)[:12]}, recomputed {actual[:12]}. "
                                 f"{_FIX_EXTRACT}")

    def check_points(self) -> None:
        f, names = self.f, self.attrs.get("point_names")
        if not (isinstance(names, list) and all(isinstance(s, str) for s in names)):
            if "point_names" in self.attrs:
                self.add("metadata", f"point_names must be a JSON list of names; got "
                                     f"{names!r}. {_FIX_EXTRACT}")
            return
        stored = list(f[schema.POINTS].keys()) if schema.POINTS in f else []
        if set(stored) != set(names) or len(set(names)) != len(names):
            self.add("metadata", f"point_names must list each dataset of /points once; "
                                 f"point_names {names} vs /points {sorted(stored)}. "
                                 f"{_FIX_EXTRACT}")
        for name in (n for n in names if n in stored):
            dset = f[schema.POINTS][name]
            absent = [k for k in schema.POINT_ATTRS if k not in dset.attrs]
            if absent:
                self.add("metadata", f"/points/{name} must have the attributes "
                                     f"{list(schema.POINT_ATTRS)}; missing {absent}. "
                                     f"{_FIX_EXTRACT}")
                continue
            try:
                record = SkipPoint.from_dict(json.loads(decode_attr(dset.attrs["skip_point"])))
            except (TypeError, ValueError) as err:
                self.add("metadata", f"/points/{name} skip_point must be a SkipPoint record; "
                                     f"{err}")
                continue
            if record.name != name:
                self.add("metadata", f"/points/{name} must hold the record of {name!r}; it holds "
                                     f"{record.name!r}. {_FIX_EXTRACT}")
            self.records[name] = record
        order = [self.records[n].index for n in names if n in self.records]
        if any(a >= b for a, b in zip(order, order[1:])):
            self.add("metadata", f"point_names must be in execution order (increasing "
                                 f"SkipPoint.index); got indices {order}. {_FIX_EXTRACT}")

    # ---- shapes ----------------------------------------------------------------------------
    def expect(self, key: str, shape: tuple, dtypes: tuple[str, ...]) -> bool:
        dset = self.f[key]
        ok = tuple(dset.shape) == tuple(shape) and (not dtypes or str(dset.dtype) in dtypes)
        if not ok:
            want = "x".join(map(str, shape)) + (f" {'/'.join(dtypes)}" if dtypes else "")
            self.add("shape", f"/{key} must be {want}; it is "
                              f"{'x'.join(map(str, dset.shape))} {dset.dtype}. {_FIX_EXTRACT}")
        return ok

    def check_shapes(self) -> None:
        f, n = self.f, self.n
        if n is None:
            return
        size = self.attrs.get("input_size")
        hw = tuple(size) if isinstance(size, list) and len(size) == 2 else None
        if schema.WRITTEN in f:
            self.expect(schema.WRITTEN, (n,), ("uint8",))
        for key in (schema.IDS, schema.INDEX):
            if key in f:
                self.expect(key, (n,), ())
        if schema.LABELS in f:
            self.expect(schema.LABELS, (n, *(hw or f[schema.LABELS].shape[1:])), ("uint8",))
        if schema.IMAGES in f:
            self.expect(schema.IMAGES, (n, 3, *(hw or f[schema.IMAGES].shape[2:])), ("uint8",))
        names = [p for p in (self.attrs.get("point_names") or []) if p in self.records]
        for key, dtype in ((schema.NONFINITE, "int64"), (schema.ABS_ERROR, "float32")):
            if key in f:
                self.expect(key, (n, len(self.attrs.get("point_names") or [])), (dtype,))
        for name in names:
            self.check_point_shape(name)

    def check_point_shape(self, name: str) -> None:
        dset, record = self.f[schema.POINTS][name], self.records[name]
        try:
            stored = tuple(json.loads(decode_attr(dset.attrs["stored_size"])))
        except (TypeError, ValueError):
            self.add("metadata", f"/points/{name} stored_size must be a JSON [h, w]; got "
                                 f"{dset.attrs['stored_size']!r}. {_FIX_EXTRACT}")
            return
        pooling, max_size = decode_attr(dset.attrs["pooling"]), self.attrs.get("max_size") or 0
        if pooling == "none" and stored != record.size:
            self.add("shape", f"/points/{name} stored_size must equal the point's size "
                              f"{list(record.size)} without pooling; got {list(stored)}. "
                              f"{_FIX_EXTRACT}")
        elif pooling == "area" and (any(s > r for s, r in zip(stored, record.size))
                                    or (max_size and max(stored) > max_size)):
            self.add("shape", f"/points/{name} stored_size must be at most its size "
                              f"{list(record.size)} and max_size {max_size} after area pooling; "
                              f"got {list(stored)}. {_FIX_EXTRACT}")
        elif pooling not in ("none", "area"):
            self.add("metadata", f"/points/{name} pooling must be 'none' or 'area'; got "
                                 f"{pooling!r}. {_FIX_EXTRACT}")
        try:
            kept = stored_channels(dset, record.channels)
        except (TypeError, ValueError):
            kept = ()
        if "channels" in dset.attrs and not (
                kept and list(kept) == sorted(set(kept)) and 0 <= kept[0]
                and kept[-1] < record.channels):
            self.add("metadata", f"/points/{name} channels must be a JSON list of distinct "
                                 f"increasing channel indices below {record.channels}; got "
                                 f"{str(decode_attr(dset.attrs['channels']))[:80]!r}. "
                                 f"{_FIX_EXTRACT}")
            return
        dtype = self.attrs.get("dtype")
        ok = self.expect(f"{schema.POINTS}/{name}", (self.n, len(kept), *stored),
                         (dtype,) if dtype else ())
        if ok:
            self.scannable.append(name)
            if dset.chunks and tuple(dset.chunks[1:]) != tuple(dset.shape[1:]):
                self.notes.append(f"{name}: chunks {dset.chunks} split a sample, so reading one "
                                  "sample is several reads (R-13.1 wants whole samples).")

    # ---- completeness ----------------------------------------------------------------------
    def check_completeness(self) -> None:
        f, n = self.f, self.n
        if schema.WRITTEN not in f or n is None or f[schema.WRITTEN].shape != (n,):
            return
        self.flags = f[schema.WRITTEN][()]
        self.bytes_read += self.flags.nbytes
        odd = np.flatnonzero((self.flags != 0) & (self.flags != 1))
        if odd.size:
            self.add("completeness", f"written flags must be 0 or 1; {odd.size} are not, first "
                                     f"{self.sample(odd[0])} = {self.flags[odd[0]]}. "
                                     f"{_FIX_EXTRACT}")
        self.written = int(np.count_nonzero(self.flags == 1))
        complete = bool(self.attrs.get("complete"))
        partial = self.path.name.endswith(schema.PARTIAL_SUFFIX)
        if complete and self.written < n:
            first = int(np.flatnonzero(self.flags != 1)[0])
            self.add("completeness", f"a cache marked complete must have every sample flagged "
                                     f"written; {self.written} of {n} are, first missing "
                                     f"{self.sample(first)}. Fix: re-extract with --force (a "
                                     f"cache marked complete is never resumed).")
        if complete and partial:
            final = self.path.name[:-len(schema.PARTIAL_SUFFIX)]
            self.add("completeness", f"a finished cache must not keep the "
                                     f"{schema.PARTIAL_SUFFIX} name; {self.path.name} is marked "
                                     f"complete (the writer stopped before renaming). Fix: "
                                     f"re-run the extract command, or rename it to {final}.")
        if not complete and not partial:
            self.add("completeness", f"a cache under its final name must be marked complete; "
                                     f"{self.path.name} has complete=False ({self.written} of "
                                     f"{n} written; the writer never leaves one so). Fix: "
                                     f"re-extract with --force.")
        if not complete and partial:
            self.notes.append(f"in progress: {self.written} of {n} samples written; values are "
                              "checked for those only.")

    # ---- values ----------------------------------------------------------------------------
    def scan(self, block_bytes: int, progress: bool) -> None:
        if self.flags is None:
            return
        f = self.f
        stats_shape = (self.n, len(self.attrs.get("point_names") or []))
        stats_ok = schema.NONFINITE in f and f[schema.NONFINITE].shape == stats_shape
        self.bound_ok = (schema.ABS_ERROR in f and f[schema.ABS_ERROR].shape == stats_shape
                         and decode_attr(f[schema.ABS_ERROR].attrs.get("statistic")) == "bound")
        keys = [f"{schema.POINTS}/{p}" for p in self.scannable]
        keys += [k for k in (schema.LABELS, schema.IMAGES) if k in f and f[k].shape[0] == self.n]
        bar = _bar(sum(f[k].nbytes for k in keys), progress)
        try:
            for key in keys:
                name = key.split("/", 1)[1] if key.startswith(schema.POINTS + "/") else None
                column = (self.attrs["point_names"].index(name)
                          if name is not None and stats_ok else None)
                self.scan_dataset(key, name, column, block_bytes, bar)
        finally:
            if bar is not None:
                bar.close()

    def scan_dataset(self, key, name, column, block_bytes, bar) -> None:
        dset = self.f[key]
        row_bytes = max(1, int(np.prod(dset.shape[1:])) * dset.dtype.itemsize)
        block = max(1, block_bytes // row_bytes)
        mismatches, bounds, known, first_known = [], [], 0, None
        tiny_rows, zero_rows, checked = 0, 0, 0
        classes, ignore = len(self.attrs.get("classes") or []), self.attrs.get("ignore_index")
        bad_labels = []
        for start in range(0, self.n, block):
            stop = min(start + block, self.n)
            written = self.flags[start:stop] == 1
            if bar is not None:  # rows skipped (unwritten) or unreadable count as done
                bar.update((stop - start) * row_bytes)
            if not written.any():
                continue
            try:
                data = dset[start:stop]
            except OSError as err:
                self.add("read", f"/{key} rows {start}:{stop} must be readable; {err}. "
                                 f"{_FIX_EXTRACT}")
                continue
            self.bytes_read += data.nbytes
            if name is not None and data.dtype.kind == "f":
                counted = np.count_nonzero(~np.isfinite(data.reshape(len(data), -1)), axis=1)
                agree = np.ones(len(data), bool)
                if column is not None:
                    recorded = self.f[schema.NONFINITE][start:stop, column]
                    agree = counted == recorded
                    for r in np.flatnonzero(written & ~agree):
                        mismatches.append((start + r, int(counted[r]), int(recorded[r])))
                    if self.bound_ok and data.dtype == np.float16:
                        recorded = self.f[schema.ABS_ERROR][start:stop, column]
                        ok, expected = _bound_agrees(data, recorded, counted)
                        bounds += [(start + r, float(expected[r]), float(recorded[r]))
                                   for r in np.flatnonzero(written & ~ok)]
                if data.dtype == np.float16:
                    tiny, zero = float16_underflow(data)
                    tiny_rows += int((tiny & written).sum())
                    zero_rows += int((zero & written).sum())
                    checked += int(written.sum())
                hits = np.flatnonzero(written & agree & (counted > 0))  # recorded, so a note
                known += int(counted[hits].sum())
                if hits.size and first_known is None:
                    first_known = start + int(hits[0])
            elif key == schema.LABELS and classes:
                invalid = (data >= classes) & (data != ignore)
                rows = np.flatnonzero(written & invalid.reshape(len(data), -1).any(axis=1))
                bad_labels += [(start + int(r), int(data[r][invalid[r]][0])) for r in rows]
        self.add_differences("nonfinite", f"{name}: /stats/nonfinite must count the NaN/Inf "
                             "values of each sample", mismatches, "counted")
        self.add_differences("abs_error", f"{name}: /stats/abs_error must hold half the float16 "
                             "spacing at each sample's largest finite |value|",
                             [(r, f"{a:.6g}", f"{b:.6g}") for r, a, b in bounds], "recomputed")
        if known:
            self.notes.append(f"{name}: {known} non-finite value(s) (NaN/Inf), first in sample "
                              f"{self.sample(first_known)}.")
        if tiny_rows:
            self.notes.append(underflow_message(name, tiny_rows, zero_rows, checked))
        if bad_labels:
            row, value = bad_labels[0]
            self.add("labels", f"labels must be class indices in [0, {classes}) or "
                               f"{ignore}; {len(bad_labels)} sample(s) have others, first "
                               f"{self.sample(row)} with {value}. {_FIX_EXTRACT}")


def recheck_tail(path: str, written: np.ndarray) -> np.ndarray:
    """Flagged rows of a partial cache, among the last chunk's worth of each array, that do
    not read back as recorded and must be extracted again before resuming (R-5.2).

    A flag is set only after its rows were flushed, which a killed process cannot undo; a
    machine that crashes can lose pages the kernel had not yet written, the last ones most
    likely. Checked per point: readable, the NaN/Inf count against ``/stats/nonfinite``, and
    (``bound`` caches, float16) the error bound recomputed against ``/stats/abs_error``, which
    a zeroed or stale row fails unless it held the same largest value; labels: class indices.
    """
    flagged = np.flatnonzero(written)
    bad: set[int] = set()
    if not flagged.size:
        return np.zeros(0, np.int64)
    with open_h5(Path(path)) as f:
        names = json.loads(decode_attr(f.attrs["point_names"]))
        bound = decode_attr(f[schema.ABS_ERROR].attrs.get("statistic")) == "bound"
        classes = len(json.loads(decode_attr(f.attrs["classes"])))
        ignore = int(f.attrs["ignore_index"])
        for key, column in [*((f"{schema.POINTS}/{n}", p) for p, n in enumerate(names)),
                            *([(schema.LABELS, None)] if classes else [])]:
            dset = f[key]
            rows = dset.chunks[0] if dset.chunks else 1
            lo = int(max(0, flagged[-1] - rows + 1))
            hi = int(flagged[-1]) + 1
            mine = written[lo:hi] == 1
            try:
                data = dset[lo:hi]
            except OSError:
                bad.update(lo + np.flatnonzero(mine))
                continue
            if column is None:
                wrong = ((data >= classes) & (data != ignore)).reshape(len(data), -1).any(1)
            else:
                counted = np.count_nonzero(~np.isfinite(data.reshape(len(data), -1)), axis=1)
                wrong = counted != f[schema.NONFINITE][lo:hi, column]
                if bound and data.dtype == np.float16:
                    ok, _ = _bound_agrees(data, f[schema.ABS_ERROR][lo:hi, column], counted)
                    wrong |= ~ok
            bad.update(lo + np.flatnonzero(mine & wrong))
    return np.array(sorted(bad), np.int64)


def _bound_agrees(data: np.ndarray, recorded: np.ndarray, counted: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float16 ``data``: whether the recorded error bound is the one recomputed from
    the stored values, and that recomputed bound. ``inf`` agrees where a value is not finite:
    a finite value overflowed, which the stored copy cannot show."""
    expected = _error_bound_of_stored(data)
    return (recorded == expected) | (np.isinf(recorded) & (counted > 0)), expected


def _error_bound_of_stored(data: np.ndarray) -> np.ndarray:
    """Per row of float16 ``data``: half the float16 spacing at its largest finite magnitude
    (what ``error_stat="bound"`` records, computed here with numpy from the stored values)."""
    flat = np.abs(data.reshape(len(data), -1))
    largest = np.where(np.isfinite(flat), flat, np.float16(0)).max(axis=1)
    # spacing to the next float16 up; at 65504 the next is inf, and the spacing is that below
    largest = np.minimum(largest, np.float16(np.nextafter(np.float16(65504), np.float16(0))))
    return np.spacing(largest).astype(np.float32) / 2


def underflow_message(point: str, tiny: int, zero: int, checked: int) -> str:
    """The one-line note for a float16 point whose samples hold no normal value."""
    return (f"point {point!r}: {tiny} of {checked} samples hold no value in float16's normal "
            f"range (every |value| < 6.1e-05; {zero} of them all zero), where float16 keeps few "
            "or no significant bits and the absolute error recorded looks small; unless these "
            "activations are truly zero, re-extract with --dtype float32 (a randomly "
            "initialised MobileNet or EfficientNet computes activations near 1e-8).")


def float16_underflow(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of float16 ``data``: whether no value of it is in float16's normal range (every
    |value| below 2**-14 = 6.1e-05, where float16 keeps at most 10 significant bits, fewer the
    smaller it is, and rounds below 6e-08 to 0), and whether it is all zero. Reads the bits:
    one integer pass.

    Examples:
        >>> float16_underflow(np.array([[1e-5, 0], [0, -0.0], [1e-3, 1e-9]], np.float16))
        (array([ True,  True, False]), array([False,  True, False]))
    """
    top = (data.reshape(len(data), -1).view(np.uint16) & 0x7FFF).max(axis=1)
    return top < 0x0400, top == 0


#: Half float16's spacing below its normal range (2**-14): the most any such value rounds by.
_SUBNORMAL_ERROR = 2.0 ** -25


def underflow_summary(path: str | os.PathLike, rows: int = 8
                      ) -> list[tuple[str, int, int, int]]:
    """``(point, rows without a normal value, of them all zero, rows checked)`` for every
    float16 point of a cache with such rows, over its first ``rows`` samples (one read per
    point whose recorded errors do not rule it out): what extraction checks before it reports.
    :func:`verify` checks every sample."""
    with open_h5(Path(path)) as f:
        names = json.loads(decode_attr(f.attrs["point_names"]))
        # a row without a normal value rounds by at most 2**-25, whichever statistic is recorded
        # (the bound is exactly that there): a larger error rules the row out without reading it
        errors = f[schema.ABS_ERROR][:rows] if schema.ABS_ERROR in f else None
        out = []
        for k, name in enumerate(names):
            dset = f[f"{schema.POINTS}/{name}"]
            if dset.dtype != np.float16 or not dset.shape[0]:
                continue
            if errors is not None and (errors[:, k] > _SUBNORMAL_ERROR).all():
                continue
            tiny, zero = float16_underflow(dset[:rows])
            if tiny.any():
                out.append((name, int(tiny.sum()), int(zero.sum()), len(tiny)))
        return out


def _bar(total: int, progress: bool):
    if not progress or os.environ.get("FEATLAB_PROGRESS") == "0":
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="verify", leave=False)
