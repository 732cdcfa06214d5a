"""open_cache on finished single-file and distributed caches: values, lazy indexing, batches,
metadata, errors, the chunk cache and sample joins."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import featlab.cache.arrays as arrays_mod
from featlab.cache import schema
from featlab.cache.reader import (CacheArray, PointNotInCacheError, check_same_samples,
                                  open_cache)
from featlab.cache.summary import format_summary, inspect_cache, summary
from featlab.errors import CacheError, ConfigError, SkipPointNotFoundError

from .conftest import PARTIAL_ROWS


def test_values_read_back_equal_what_was_written(complete_cache):
    exp = complete_cache
    POINTS, CLASSES, INPUT = exp.points, exp.classes, exp.input_size
    with open_cache(exp.path) as cache:
        assert cache.points == POINTS  # the SkipPoint records, in execution order
        assert cache.point_names == ["conv1", "layer1.0", "layer1.1"]
        assert cache.ids == exp.ids and len(cache) == 12
        np.testing.assert_array_equal(cache.index, exp.index)
        np.testing.assert_array_equal(cache.rows, np.arange(12))
        for p in POINTS:
            arr = cache[p.name]
            assert isinstance(arr, CacheArray)
            assert arr.shape == exp.arrays[p.name].shape and arr.dtype == np.float32
            np.testing.assert_array_equal(arr[:], exp.arrays[p.name])
        np.testing.assert_array_equal(cache.labels[:], exp.labels)
        np.testing.assert_array_equal(cache.images[:], exp.images)
        np.testing.assert_array_equal(cache.nonfinite[:], np.zeros((12, 3)))
        assert cache.complete and cache.num_samples == 12 and cache.schema_version == 1
        assert cache.classes == CLASSES and cache.ignore_index == 255
        assert cache.input_size == INPUT and cache.dtype == "float32" and cache.max_size == 0
        assert cache.model["name"] == "resnet18" and cache.data["split"] == "val"
        assert cache.world_size == 1 and cache.versions["featlab"] == "0.1.0"
        assert cache.stored_size("layer1.1") == (4, 4)
        assert "layer1.0" in cache and POINTS[0] in cache and "layer9" not in cache


@pytest.mark.parametrize("key", [
    5, -1, slice(None), slice(2, 9), slice(10, 1, -3), slice(3, 3),
    [7, 2, 2, 11, 0], np.array([1, 4, 5, 6, 10]), np.array([], dtype=int), [-2, 0],
    np.arange(12) % 3 == 0, (slice(1, 4), 2), ([6, 1], 0, slice(1, 3)), (4, slice(None), 1, 1),
    Ellipsis,
])
def test_lazy_indexing_matches_numpy(complete_cache, key):
    expected = complete_cache.arrays["layer1.0"]
    got = open_cache(complete_cache.path)["layer1.0"][key]
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, expected[key])


def test_indexing_reads_only_what_is_asked(complete_cache, monkeypatch):
    cache = open_cache(complete_cache.path)
    arr = cache["layer1.1"]
    reads = []
    real = arrays_mod.read_rows

    def spy(dset, rows, rest=()):
        reads.append(np.asarray(rows).tolist())
        return real(dset, rows, rest)

    monkeypatch.setattr(arrays_mod, "read_rows", spy)
    assert arr.shape == (12, 16, 4, 4) and len(arr) == 12 and arr.nbytes == 12 * 256 * 4
    assert reads == []  # shape / dtype / len read nothing
    arr[[9, 3]]
    assert reads == [[9, 3]]


def test_read_rows_makes_one_read_per_run_of_consecutive_rows():
    class Recording:
        def __init__(self, data):
            self.data, self.keys = data, []

        def __getitem__(self, key):
            self.keys.append(key)
            return self.data[key]

    data = np.arange(40).reshape(20, 2)
    dset = Recording(data)
    out = arrays_mod.read_rows(dset, np.array([9, 3, 4, 5, 10, 3]))
    np.testing.assert_array_equal(out, data[[9, 3, 4, 5, 10, 3]])
    assert [k[0] for k in dset.keys] == [slice(3, 6), slice(9, 11)]


@pytest.mark.parametrize("key", [12, -13, [0, 12], np.ones(5, bool), [[1, 2]], 1.5])
def test_bad_indices_raise_index_error(complete_cache, key):
    with pytest.raises(IndexError):
        open_cache(complete_cache.path)["conv1"][key]


def test_batches_cover_every_row_once_in_order(complete_cache):
    exp = complete_cache
    cache = open_cache(exp.path)
    batches = list(cache.batches(["layer1.1", "conv1"], batch_size=5, images=True))
    assert [len(b["ids"]) for b in batches] == [5, 5, 2]
    for key in ("rows", "index", "layer1.1", "conv1", "labels", "images"):
        got = np.concatenate([b[key] for b in batches])
        want = {"rows": np.arange(12), "index": exp.index, "labels": exp.labels,
                "images": exp.images}.get(key, exp.arrays.get(key))
        np.testing.assert_array_equal(got, want)
    assert sum((b["ids"] for b in batches), []) == exp.ids
    assert set(batches[0]) == {"ids", "rows", "index", "layer1.1", "conv1", "labels", "images"}


def test_batches_as_tensors_and_selections(complete_cache):
    cache = open_cache(complete_cache.path)
    POINTS = complete_cache.points
    (batch,) = cache.batches("layer1.*", batch_size=64, labels=False, tensors=True)
    assert set(batch) == {"ids", "rows", "index", "layer1.0", "layer1.1"}
    assert isinstance(batch["layer1.0"], torch.Tensor) and batch["layer1.0"].dtype == torch.float32
    torch.testing.assert_close(batch["layer1.1"],
                               torch.from_numpy(complete_cache.arrays["layer1.1"]))
    assert cache.select("stages") == ["layer1.0", "layer1.1"]  # last point at each stride
    assert cache.select(None) == cache.select("all") == cache.point_names
    assert cache.select([POINTS[2], "conv1"]) == ["conv1", "layer1.1"]
    with pytest.raises(ConfigError, match="batch_size"):
        next(cache.batches(batch_size=0))


def test_array_to_torch_keeps_dtype(make_cache):
    exp = make_cache(dtype="float16")
    t = open_cache(exp.path)["conv1"].torch([2, 0])
    assert t.dtype == torch.float16
    torch.testing.assert_close(t, torch.from_numpy(exp.arrays["conv1"][[2, 0]]))


def test_unknown_point_name_suggests_close_matches(complete_cache):
    cache = open_cache(complete_cache.path)
    with pytest.raises(PointNotInCacheError) as info:
        cache["layer1.2"]
    err = info.value
    assert isinstance(err, CacheError) and isinstance(err, KeyError)
    assert isinstance(err, SkipPointNotFoundError)
    msg = str(err)
    assert "'layer1.2'" in msg and "Did you mean 'layer1.1'" in msg and "Fix:" in msg
    assert "\n" not in msg
    with pytest.raises(PointNotInCacheError, match="'layr3'"):
        list(cache.batches(["conv1", "layr3"]))
    with pytest.raises(PointNotInCacheError, match="'layer4.*'"):
        cache.dataset("layer4.*")


def test_missing_images_is_a_clear_error(make_cache):
    cache = open_cache(make_cache(images=False).path)
    assert not cache.has_images
    with pytest.raises(ConfigError, match="save_images=True"):
        cache.images
    with pytest.raises(ConfigError, match="images=False"):
        next(cache.batches(images=True))


def test_missing_file_error_is_one_line_with_a_fix(tmp_path):
    with pytest.raises(CacheError) as info:
        open_cache(tmp_path / "nope.h5")
    assert isinstance(info.value, OSError)
    msg = str(info.value)
    assert "nope.h5" in msg and "Fix:" in msg and "\n" not in msg


def test_only_partial_exists_and_partial_not_allowed(partial_cache):
    final = str(partial_cache.path)[:-len(schema.PARTIAL_SUFFIX)]
    with pytest.raises(CacheError, match=r"only .*\.partial' exists.*allow_partial=True"):
        open_cache(final, allow_partial=False)


def test_only_shards_exist(distributed_cache):
    os.remove(distributed_cache.path)
    with pytest.raises(CacheError, match=r"shard folder .*rank-0-of-2\.h5"):
        open_cache(distributed_cache.path)


def test_not_a_featlab_cache(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(CacheError, match="must be an HDF5 file"):
        open_cache(text)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CacheError, match="schema='featlab-cache'.*without|no 'schema'"):
        open_cache(other)
    with pytest.raises(CacheError, match="folder"):
        open_cache(tmp_path)


@pytest.mark.parametrize("version, fix", [(2, "upgrade featlab"), (0, "re-extract")])
def test_unsupported_schema_version(complete_cache, version, fix):
    with h5py.File(complete_cache.path, "r+") as f:
        f.attrs["schema_version"] = version
    with pytest.raises(CacheError, match=f"reads cache schema version 1.*has version {version}"
                                         f".*{fix}"):
        open_cache(complete_cache.path)


def test_damaged_layout_points_to_verify(complete_cache):
    with h5py.File(complete_cache.path, "r+") as f:
        del f["points/conv1"]
    with pytest.raises(CacheError, match="points/conv1.*featlab verify"):
        open_cache(complete_cache.path)


def test_chunk_cache_holds_a_few_chunks_of_the_largest_point(make_cache):
    exp = make_cache(chunk_rows=200, n=210)
    cache = open_cache(exp.path)
    cache["conv1"][0]
    _, _, nbytes, _ = cache._h5().id.get_access_plist().get_cache()
    largest = 200 * 8 * 8 * 8 * 4  # chunk rows x C x h x w x float32 bytes (conv1, layer1.0)
    assert nbytes == 4 * largest > 1 << 20  # above HDF5's default of 1 MiB
    cache.close()  # HDF5 shares one open file per process: the first opener's settings win
    assert open_cache(exp.path, rdcc_nbytes=3 << 20)._h5().id.get_access_plist().get_cache()[
        2] == 3 << 20


def test_distributed_cache_reads_as_one(distributed_cache, tmp_path, monkeypatch):
    exp = distributed_cache
    POINTS = exp.points
    monkeypatch.chdir(tmp_path / "val.h5.shards")  # relative sources resolve from the main file
    cache = open_cache(exp.path)
    assert cache.ids == exp.ids and cache.world_size == 2 and cache.complete
    for p in POINTS:
        np.testing.assert_array_equal(cache[p.name][:], exp.arrays[p.name])
        np.testing.assert_array_equal(cache[p.name][[11, 6, 7]], exp.arrays[p.name][[11, 6, 7]])
    np.testing.assert_array_equal(cache.labels[5:9], exp.labels[5:9])
    info = summary(cache)
    cache.close()  # one process may not mix locking=False (featlab) and h5py's default locking
    with h5py.File(exp.path, "r") as f:  # plain h5py, no featlab
        np.testing.assert_array_equal(f["points/layer1.1"][:], exp.arrays["layer1.1"])
        assert f["ids"].asstr()[()].tolist() == exp.ids
    assert len(info["files"]) == 3 and info["world_size"] == 2
    # summed over the shards, whose 7 and 5 rows fill 3 and 2 whole chunks of 3 rows
    assert info["points"][0]["bytes"] == (9 + 6) * 8 * 8 * 8 * 4


def test_distributed_cache_with_a_missing_shard_refuses_to_open(distributed_cache):
    os.remove(distributed_cache.path.parent / "val.h5.shards" / "rank-1-of-2.h5")
    with pytest.raises(CacheError, match="rank-1-of-2.h5"):
        open_cache(distributed_cache.path)


def test_summary_is_json_and_holds_the_facts(complete_cache):
    cache = open_cache(complete_cache.path)
    info = summary(cache)
    assert json.loads(json.dumps(info)) == info
    assert info == summary(str(complete_cache.path))
    assert (info["written"], info["total"], info["complete"]) == (12, 12, True)
    assert info["schema_version"] == 1 and info["dtype"] == "float32"
    assert info["error_stat"] == "exact"  # no `statistic` attribute: a cache from before it
    assert info["model"]["name"] == "resnet18" and info["data"]["name"] == "shapes"
    assert info["classes"] == list(complete_cache.classes)
    assert info["input_size"] == list(complete_cache.input_size)
    p = info["points"][2]
    assert (p["name"], p["shape"], p["stored_size"], p["stride"], p["rf_size"]) == (
        "layer1.1", [12, 16, 4, 4], [4, 4], 4, 23)
    assert p["bytes"] == p["bytes_per_sample"] * 12 == 12 * 16 * 4 * 4 * 4
    # float32 records no rounding error; the counts are /stats/nonfinite's column sums
    assert p["max_abs_error"] == 0.0 and p["overflow_samples"] == 0
    assert [q["nonfinite"] for q in info["points"]] == complete_cache.nonfinite.sum(0).tolist()
    assert info["file_size"] == os.path.getsize(complete_cache.path)
    assert json.loads(inspect_cache(complete_cache.path, as_json=True)) == info
    assert inspect_cache(complete_cache.path) == format_summary(info)


def test_summary_counts_only_written_samples(partial_cache):
    with h5py.File(partial_cache.path, "r+") as f:  # junk in the rows not flagged written
        unwritten = np.flatnonzero(f[schema.WRITTEN][:] == 0)
        f[schema.NONFINITE][unwritten[0]] = 99
        f[schema.ABS_ERROR][unwritten[0]] = np.inf
        f[schema.ABS_ERROR][unwritten[1]] = 7.0
    info = summary(partial_cache.path)
    assert [p["nonfinite"] for p in info["points"]] == \
        partial_cache.nonfinite[PARTIAL_ROWS].sum(0).tolist()
    assert all(p["max_abs_error"] == 0.0 and p["overflow_samples"] == 0 for p in info["points"])


def test_repr_and_html_summarise_the_cache(make_cache):
    cache = open_cache(make_cache(max_size=4, dtype="float16").path)
    text, page = repr(cache), cache._repr_html_()
    for fact in ("resnet18", "shapes/val", "complete: 12 of 12", "layer1.0", "8x4x4",
                 "16x4x4", "float16", "max_size 4", "4 classes"):
        assert fact in text, fact
    assert "area from 8x8" in text  # pooled points say so
    assert "<table>" in page and "layer1.1" in page and "resnet18" in page
    assert "complete: 12 of 12" in page
    assert "versions" in page and "torch 2.14.1" in page  # the fixture's, as featlab inspect


def test_identity_names_what_produced_the_cache(make_cache):
    cache = open_cache(make_cache(dtype="float16").path)
    ident = cache.identity()
    assert ident == {
        "path": str(cache.path), "num_samples": 12, "ids_sha256": cache.ids_sha256,
        "split": "val", "data": "shapes", "model": "resnet18",
        "weights": cache.model["weights"], "weights_sha256": cache.model["weights_sha256"],
        "model_state": cache.settings.get("model_state"), "input_size": list(cache.input_size),
        "dtype": "float16", "max_size": None, "max_channels": 0, "channel_seed": 0}
    other = open_cache(make_cache("b.h5", ids=[f"val/s9/{i:06d}" for i in range(12)]).path)
    assert other.identity()["ids_sha256"] != ident["ids_sha256"]
    assert os.path.isabs(ident["path"])  # a record read from elsewhere still finds it


def test_check_same_samples(make_cache):
    a = open_cache(make_cache("a.h5", seed=1).path)
    b = open_cache(make_cache("b.h5", seed=2).path)  # other features, same samples
    check_same_samples(a, b)
    ids = [f"val/s0/{i:06d}" for i in range(12)]
    shuffled = ids[:4] + [ids[7]] + ids[5:7] + [ids[4]] + ids[8:]
    c = open_cache(make_cache("c.h5", ids=shuffled).path)
    with pytest.raises(CacheError) as info:
        check_same_samples(a, c)
    msg = str(info.value)
    assert "position 4: 'val/s0/000004' vs 'val/s0/000007'" in msg and "Fix:" in msg
    d = open_cache(make_cache("d.h5", n=10).path)
    with pytest.raises(CacheError, match="12 vs 10 samples, equal up to position 10"):
        check_same_samples(a, d)
    e = open_cache(make_cache("e.h5", written=np.arange(12) < 8).path)  # same ids, 8 written
    with pytest.raises(CacheError, match="expose the same samples.*12 and .* 8 of 12"):
        check_same_samples(a, e)
