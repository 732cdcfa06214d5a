"""Caches written by hand with plain h5py, following featlab/cache/schema.py exactly.

Independent of featlab's writer on purpose: the reader is tested against the format contract,
and writing a cache here without featlab shows the format is simple enough to produce with any
HDF5 library. Like the writer (per the schema), storage is allocated up front with no fill, all
metadata is written before any sample, then rows and only then their ``written`` flags.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pytest

from featlab.cache import schema
from featlab.cache._reading import ids_sha256
from featlab.points import SkipPoint

# Records as skip_points(featlab.testing.TinyResNet(), input_size=16) measures them ("stages"
# keeps indices 3 and 4; conv1 is index 0).
POINTS = [
    SkipPoint("conv1", 0, "conv1", 8, (8, 8), 2, 3, 2, 1),
    SkipPoint("layer1.0", 3, "layer1.0", 8, (8, 8), 2, 11, 2, 5),
    SkipPoint("layer1.1", 4, "layer1.1", 16, (4, 4), 4, 23, 4, 11),
]
CLASSES = ["background", "circle", "square", "triangle"]
INPUT = (16, 16)
JUNK = 1234.5  # what unflagged rows hold: a reader must never return it


@dataclass
class Expected:
    """What a fixture wrote: full-N arrays (all rows), and which rows are flagged."""

    path: Path
    ids: list
    index: np.ndarray
    points: list
    arrays: dict
    labels: np.ndarray
    images: np.ndarray
    written: np.ndarray  # bool [N]
    nonfinite: np.ndarray
    chunk_rows: int
    classes: tuple = tuple(CLASSES)
    input_size: tuple = INPUT

    @property
    def rows(self) -> np.ndarray:
        return np.flatnonzero(self.written)


def make_data(n=12, *, seed=0, dtype="float32", max_size=0, ids=None):
    """Deterministic content for a cache of n samples."""
    rng = np.random.default_rng(seed)
    ids = ids or [f"val/s0/{i:06d}" for i in range(n)]
    stored = {p.name: _stored(p.size, max_size) for p in POINTS}
    arrays = {p.name: rng.standard_normal((n, p.channels, *stored[p.name])).astype(dtype)
              for p in POINTS}
    labels = rng.integers(0, len(CLASSES), (n, *INPUT), dtype=np.uint8)
    labels[:, 0, :] = 255  # an ignored border row
    images = rng.integers(0, 256, (n, 3, *INPUT), dtype=np.uint8)
    return dict(ids=ids, index=np.arange(n, dtype=np.int64) + 100, arrays=arrays, labels=labels,
                images=images, stored=stored, dtype=dtype, max_size=max_size)


def _stored(size, max_size):
    return tuple(min(s, max_size) for s in size) if max_size else tuple(size)


def root_attrs(data, n, *, complete, world_size=1):
    attrs = {
        "schema": schema.SCHEMA,
        "schema_version": schema.SCHEMA_VERSION,
        "complete": complete,
        "num_samples": n,
        "point_names": json.dumps([p.name for p in POINTS]),
        "model": json.dumps({"name": "resnet18", "weights": "none", "mean": [0.485, 0.456, 0.406],
                             "std": [0.229, 0.224, 0.225], "input_size": 224,
                             "num_classes": 1000, "weights_sha256": None, "seed": 0}),
        "data": json.dumps({"name": "shapes", "split": "val", "root": None, "size": 16,
                            "seed": 0, "length": n}),
        "classes": json.dumps(CLASSES),
        "ignore_index": 255,
        "ids_sha256": ids_sha256(data["ids"]),
        "input_size": json.dumps(list(INPUT)),
        "dtype": data["dtype"],
        "max_size": data["max_size"],
        "settings": json.dumps({"points": [p.name for p in POINTS], "batch_size": 4}),
        "versions": json.dumps({"featlab": "0.1.0", "torch": "2.14.1", "h5py": h5py.__version__}),
        "runtime": json.dumps({"device": "cpu", "world_size": world_size, "training": False}),
        "created": "2026-01-01T00:00:00+00:00",
        "world_size": world_size,
    }
    assert set(attrs) == set(schema.ROOT_ATTRS)
    return attrs


def _create(f, name, shape, dtype, chunks=None):
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return f.create_dataset(name, shape=shape, dtype=dtype, chunks=chunks, dcpl=dcpl,
                            fill_time="never", track_times=False)


def write_file(path, data, *, written=None, complete=None, images=True, chunk_rows=4,
               world_size=1, record_nonfinite=True):
    """Write one cache file of ``data``; rows not in ``written`` get junk and flag 0."""
    n = len(data["ids"])
    written = np.ones(n, bool) if written is None else np.asarray(written, bool)
    complete = bool(written.all()) if complete is None else complete
    with h5py.File(path, "w", libver="earliest") as f:
        for key, value in root_attrs(data, n, complete=complete, world_size=world_size).items():
            f.attrs[key] = value
        for key, size in schema.SESSION_ATTR_BYTES.items():  # no session recorded
            f.attrs.create(key, b"", dtype=h5py.string_dtype("ascii", size))
        width = max(len(s.encode()) for s in data["ids"])
        sdt = h5py.string_dtype("utf-8", width)
        _create(f, schema.IDS, (n,), sdt)[:] = np.array([s.encode() for s in data["ids"]]
                                                        ).astype(sdt)
        _create(f, schema.INDEX, (n,), "int64")[:] = data["index"]
        flags = _create(f, schema.WRITTEN, (n,), "uint8")
        flags[:] = 0
        labels = _create(f, schema.LABELS, (n, *INPUT), "uint8", (chunk_rows, *INPUT))
        imgs = _create(f, schema.IMAGES, (n, 3, *INPUT), "uint8", (chunk_rows, 3, *INPUT)) \
            if images else None
        pts = {}
        for p in POINTS:
            shape = (p.channels, *data["stored"][p.name])
            pts[p.name] = _create(f, f"{schema.POINTS}/{p.name}", (n, *shape), data["dtype"],
                                  (chunk_rows, *shape))
            pts[p.name].attrs["skip_point"] = json.dumps(p.to_dict())
            pts[p.name].attrs["stored_size"] = json.dumps(list(data["stored"][p.name]))
            pts[p.name].attrs["pooling"] = "area" if data["stored"][p.name] != p.size else "none"
        nonfinite = _create(f, schema.NONFINITE, (n, len(POINTS)), "int64")
        abs_error = _create(f, schema.ABS_ERROR, (n, len(POINTS)), "float32")
        f.flush()
        # rows: real data where flagged, junk elsewhere (a half-written batch)
        counts = np.stack([np.count_nonzero(~np.isfinite(data["arrays"][p.name].reshape(n, -1)),
                                            axis=1) for p in POINTS], axis=1)
        for p in POINTS:
            pts[p.name][:] = np.where(written[:, None, None, None], data["arrays"][p.name], JUNK)
        labels[:] = np.where(written[:, None, None], data["labels"], 77)
        if imgs is not None:
            imgs[:] = np.where(written[:, None, None, None], data["images"], 7)
        nonfinite[:] = counts if record_nonfinite else 0
        abs_error[:] = 0
        f.flush()
        flags[:] = written.astype(np.uint8)
    return counts


def write_vds(path, data, shard_paths, bounds, *, complete=True):
    """A main file of virtual datasets over shard files (relative paths), per the schema."""
    n = len(data["ids"])
    with h5py.File(path, "w", libver="earliest") as main, \
            h5py.File(shard_paths[0], "r") as first:
        for key, value in root_attrs(data, n, complete=complete,
                                     world_size=len(shard_paths)).items():
            main.attrs[key] = value
        names = [schema.IDS, schema.INDEX, schema.WRITTEN, schema.LABELS, schema.IMAGES,
                 schema.NONFINITE, schema.ABS_ERROR, *(f"{schema.POINTS}/{p.name}" for p in POINTS)]
        for name in names:
            tail, dtype = first[name].shape[1:], first[name].dtype
            layout = h5py.VirtualLayout((n, *tail), dtype)
            for shard, (a, b) in zip(shard_paths, bounds):
                rel = os.path.relpath(shard, Path(path).parent)
                layout[a:b] = h5py.VirtualSource(rel, name, shape=(b - a, *tail))
            dset = main.create_virtual_dataset(name, layout,
                                               fillvalue=None if dtype.kind == "S" else 0)
            for key, value in first[name].attrs.items():
                dset.attrs[key] = value


def _expected(path, data, written, counts, chunk_rows=4):
    return Expected(Path(path), data["ids"], data["index"], POINTS, data["arrays"], data["labels"],
                    data["images"], np.asarray(written, bool), counts, chunk_rows)


@pytest.fixture
def make_cache(tmp_path):
    """Factory: ``make_cache(name, n=12, written=None, complete=None, seed=0, ...)``."""

    def make(name="val.h5", n=12, *, written=None, complete=None, seed=0, dtype="float32",
             max_size=0, ids=None, images=True, chunk_rows=4, data=None):
        data = data or make_data(n, seed=seed, dtype=dtype, max_size=max_size, ids=ids)
        n = len(data["ids"])
        written = np.ones(n, bool) if written is None else np.asarray(written, bool)
        path = tmp_path / name
        counts = write_file(path, data, written=written, complete=complete, images=images,
                            chunk_rows=chunk_rows)
        return _expected(path, data, written, counts, chunk_rows)

    return make


@pytest.fixture
def complete_cache(make_cache):
    return make_cache("val.h5")


PARTIAL_ROWS = [0, 1, 2, 5, 6, 9]  # not a prefix: shards / batches finish out of order


@pytest.fixture
def partial_cache(make_cache):
    written = np.isin(np.arange(12), PARTIAL_ROWS)
    return make_cache("val.h5" + schema.PARTIAL_SUFFIX, written=written)


@pytest.fixture
def distributed_cache(tmp_path):
    """Two shard files in ``val.h5.shards/`` (rows 0-6 and 7-11) and the VDS main file."""
    data = make_data(12, seed=3)
    out = tmp_path / "val.h5"
    shards = tmp_path / ("val.h5" + schema.SHARDS_SUFFIX)
    shards.mkdir()
    bounds = [(0, 7), (7, 12)]
    paths, counts = [], []
    for r, (a, b) in enumerate(bounds):
        part = dict(data, ids=data["ids"][a:b], index=data["index"][a:b],
                    arrays={k: v[a:b] for k, v in data["arrays"].items()},
                    labels=data["labels"][a:b], images=data["images"][a:b])
        paths.append(shards / f"rank-{r}-of-2.h5")
        counts.append(write_file(paths[-1], part, chunk_rows=3, world_size=2))
    write_vds(out, data, paths, bounds)
    return _expected(out, data, np.ones(12, bool), np.concatenate(counts), 3)
