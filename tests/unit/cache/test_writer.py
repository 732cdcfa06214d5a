"""featlab.extract: what lands in the file, checked against independent computations (on the
CPU, where the references are computed; ``tests/integration/test_extract_cuda.py`` does the same
on a GPU)."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import featlab
import featlab.testing as ft
from featlab.cache import h5file, schema
from featlab.cache.summary import format_summary, summary
from featlab.cache.verify import verify
from featlab.cache.writer import ExtractResult, extract
from featlab.data import load_dataset
from featlab.data.base import SegmentationDataset
from featlab.errors import CacheError, ConfigError, FeatlabWarning, ModelModeError
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class ArrayDataset(SegmentationDataset):
    """A featlab data set over given uint8 images [N, H, W, 3] and masks [N, H, W]."""

    name = "arrays"

    def __init__(self, images, masks, tag="a"):
        super().__init__("all", size=images.shape[1])
        self.images, self.masks, self.tag = images, masks, tag
        self.classes = ("background", "thing")
        self.ids = [f"img{i:03d}" for i in range(len(images))]

    def sample(self, i):
        return self.images[i], self.masks[i]

    def options(self):
        return {"tag": self.tag}


def arrays(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, 2, (n, size, size), dtype=np.uint8)
    masks[:, 0] = 255
    return ArrayDataset(images, masks)


def reference(model, ds, names, batch_size):
    """Float32 activations by featlab.capture over the same batches (the way a user would)."""
    out = {name: [] for name in names}
    with torch.inference_mode(), featlab.capture(model, names) as acts:
        for start in range(0, len(ds), batch_size):
            stop = min(len(ds), start + batch_size)
            x = torch.stack([ds[i]["image"] for i in range(start, stop)])
            model(SPEC.normalize(x))
            for name in names:
                out[name].append(acts[name])
    return {name: torch.cat(v) for name, v in out.items()}


def test_points_labels_ids_and_images_are_stored_as_computed(tmp_path):
    torch.set_num_threads(2)  # parallel casts and copies in the hooks
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=7)
    result = extract(model, ds, "stages", tmp_path / "c.h5", spec=SPEC, batch_size=3,
                     save_images=True, num_workers=0, progress=False, device="cpu")
    names = ["layer1.0", "layer1.1"]
    ref = reference(model, ds, names, batch_size=3)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert [i.decode() for i in f[schema.IDS][:]] == ds.ids
        assert f[schema.INDEX][:].tolist() == list(range(7))
        assert f[schema.WRITTEN][:].tolist() == [1] * 7
        for name in names:
            stored = f[f"points/{name}"]
            assert stored.dtype == np.float16 and stored.shape == (7, *ref[name].shape[1:])
            # the same batches through capture, cast by torch: bit for bit the same values
            np.testing.assert_array_equal(stored[:], ref[name].half().numpy())
            assert json.loads(stored.attrs["skip_point"])["name"] == name
            assert stored.attrs["pooling"] == "none"
        masks = np.stack([ds[i]["mask"].numpy() for i in range(7)])
        np.testing.assert_array_equal(f[schema.LABELS][:], masks)
        images = np.stack([ds.sample(i)[0].transpose(2, 0, 1) for i in range(7)])
        np.testing.assert_array_equal(f[schema.IMAGES][:], images)  # the uint8 the data set made
        # by default the bound: half numpy's float16 spacing at the largest |value|
        largest = [np.abs(ref[n].half().numpy()).reshape(7, -1).max(1) for n in names]
        bound = np.stack([np.spacing(m).astype(np.float32) / 2 for m in largest], axis=1)
        np.testing.assert_array_equal(f[schema.ABS_ERROR][:], bound)
        assert f[schema.ABS_ERROR].attrs["statistic"] == "bound"
        exact = np.stack([(ref[n] - ref[n].half().float()).abs().flatten(1).amax(1).numpy()
                          for n in names], axis=1)
        assert (exact <= bound).all() and (exact > bound / 2).all()  # a bound, and a tight one
        assert (f[schema.NONFINITE][:] == 0).all()
        attrs = f.attrs
        assert attrs["schema"] == schema.SCHEMA and bool(attrs["complete"])
        assert set(schema.ROOT_ATTRS) <= set(attrs)
        assert json.loads(attrs["point_names"]) == names
        assert json.loads(attrs["input_size"]) == [32, 32] and attrs["dtype"] == "float16"
        runtime = json.loads(attrs["runtime"])
        assert runtime["training"] is False and runtime["amp"] is False and "cudnn" in runtime
        settings = json.loads(attrs["settings"])
        assert settings["model"] == SPEC.to_dict() and settings["data"] == ds.settings()
        assert "batch_size" not in settings and "device" not in settings
    assert isinstance(result, ExtractResult)
    assert (result.num_samples, result.written, result.skipped) == (7, 7, 0)
    assert result.points == tuple(names) and result.nonfinite == ()
    assert result.bytes == (tmp_path / "c.h5").stat().st_size
    assert ExtractResult.from_dict(result.to_dict()) == result
    assert not (tmp_path / "c.h5.partial").exists()


def test_a_point_followed_by_an_in_place_op_is_stored_as_it_left_its_module(tmp_path):
    # bn1 feeds the in-place ReLU: the hook must copy before the ReLU overwrites the tensor
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=5)
    names = ["bn1", "layer1.0"]
    extract(model, ds, names, tmp_path / "c.h5", spec=SPEC, batch_size=2, dtype="float32",
            num_workers=0, progress=False, device="cpu")
    ref = reference(model, ds, names, batch_size=2)
    assert (ref["bn1"] < 0).any()  # what the ReLU would have zeroed
    with featlab.open_cache(tmp_path / "c.h5") as cache:
        for name in names:
            np.testing.assert_array_equal(cache[name][:], ref[name].numpy())


def test_the_forward_stops_after_the_deepest_point_and_stores_the_same(tmp_path):
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=5)
    calls = []
    model.fc.register_forward_hook(lambda *_: calls.append(1))
    counts = {}
    for stop in (True, False):
        before = len(calls)
        extract(model, ds, ["layer1.0"], tmp_path / f"{stop}.h5", spec=SPEC, batch_size=2,
                dtype="float32", num_workers=0, progress=False, device="cpu", stop_early=stop)
        counts[stop] = len(calls) - before  # setup's measuring forwards count in both
    assert counts[False] - counts[True] == 3  # the 3 batches ran the layers after layer1.0
    with featlab.open_cache(tmp_path / "True.h5") as a, featlab.open_cache(
            tmp_path / "False.h5") as b:
        np.testing.assert_array_equal(a["layer1.0"][:], b["layer1.0"][:])


def test_batch_size_changes_values_only_within_float32_tolerance(tmp_path):
    # what one sample at a time and batches of 16 store agree to fp32 tolerance
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=17)
    for b in (1, 16):
        extract(model, ds, "all", tmp_path / f"b{b}.h5", spec=SPEC, batch_size=b,
                dtype="float32", num_workers=0, progress=False, device="cpu")
    with featlab.open_cache(tmp_path / "b1.h5") as one, featlab.open_cache(
            tmp_path / "b16.h5") as many:
        assert one.points == many.points
        for p in one.points:
            np.testing.assert_allclose(one[p.name][:], many[p.name][:], rtol=1e-3, atol=1e-4)


class Branchy(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, hooks do not mind (R-14.1)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, 2, 1)
        self.mid = nn.Conv2d(8, 16, 3, 2, 1)
        self.flip = nn.Conv2d(16, 16, 1)

    def forward(self, x):
        x = self.mid(self.stem(x).relu())
        return self.flip(x) if x.mean() > 0 else x


def test_a_model_torch_fx_cannot_trace_is_extracted_at_named_modules(tmp_path):
    model = Branchy()
    with pytest.raises(featlab.errors.GraphTraceError, match="or extract named modules"):
        featlab.skip_points(model, 32)
    ds = load_dataset("shapes", "val", size=32, length=5)
    extract(model, ds, ["mid", "stem"], tmp_path / "c.h5", spec=SPEC, batch_size=2,
            dtype="float32", num_workers=0, progress=False, device="cpu")
    with featlab.open_cache(tmp_path / "c.h5") as cache:
        # in execution order, strides measured, the receptive field said to be unknown
        assert [(p.name, p.stride, p.size, p.rf_size) for p in cache.points] == [
            ("stem", 2, (16, 16), None), ("mid", 4, (8, 8), None)]
        assert cache.point("mid").rf_status.startswith("unknown: the model could not be traced")
        ref = reference(model, ds, ["stem", "mid"], batch_size=2)
        for name in ("stem", "mid"):
            np.testing.assert_array_equal(cache[name][:], ref[name].numpy())
    with pytest.raises(featlab.errors.GraphTraceError):  # a pattern needs the traced graph
        extract(model, ds, "stages", tmp_path / "d.h5", spec=SPEC, num_workers=0,
                progress=False, device="cpu")


def test_an_outer_module_reads_as_the_point_it_returns(tmp_path):
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=3)
    extract(model, ds, "stages", tmp_path / "c.h5", spec=SPEC, num_workers=0, progress=False,
            device="cpu")
    with h5py.File(tmp_path / "c.h5", "r") as f:  # recorded for plain h5py readers too
        assert json.loads(f["points/layer1.1"].attrs["skip_point"])["aliases"] == ["layer1"]
        assert "aliases" not in json.loads(f["points/layer1.0"].attrs["skip_point"])
    with featlab.open_cache(tmp_path / "c.h5") as cache:
        assert "layer1" in cache and cache.point("layer1").name == "layer1.1"
        np.testing.assert_array_equal(cache["layer1"][:2], cache["layer1.1"][:2])
        assert cache.select("layer1") == ["layer1.1"]
        # layer1's output is the same tensor as its last block's: what capture gives for it
        with torch.inference_mode(), featlab.capture(model, ["layer1"]) as acts:
            model(SPEC.normalize(torch.stack([ds[i]["image"] for i in range(2)])))
        np.testing.assert_array_equal(cache["layer1"][:2], acts["layer1"].half().numpy())


def test_exact_error_stat_is_the_largest_rounding_error(tmp_path):
    torch.set_num_threads(2)
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=5)
    extract(model, ds, "stages", tmp_path / "c.h5", spec=SPEC, batch_size=2,
            error_stat="exact", num_workers=0, progress=False, device="cpu")
    names = ["layer1.0", "layer1.1"]
    ref = reference(model, ds, names, batch_size=2)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        expected = np.stack([(ref[n] - ref[n].half().float()).abs().flatten(1).amax(1).numpy()
                             for n in names], axis=1)  # computed here independently
        np.testing.assert_array_equal(f[schema.ABS_ERROR][:], expected)
        assert (expected > 0).all() and f[schema.ABS_ERROR].attrs["statistic"] == "exact"
        assert json.loads(f.attrs["settings"])["error_stat"] == "exact"
    with pytest.raises(ConfigError, match="`error_stat` must be one of bound, exact; got 'max'"):
        extract(model, ds, "stages", tmp_path / "d.h5", spec=SPEC, error_stat="max",
                progress=False)


def test_area_pooling_to_max_size_float32_and_limit(tmp_path):
    model = ft.TinyResNet()
    ds = arrays(n=9, size=32)
    extract(model, ds, ["conv1", "layer1.1"], tmp_path / "c.h5", spec=SPEC, batch_size=4,
            dtype="float32", max_size=4, limit=5, num_workers=0, progress=False, device="cpu")
    ref = reference(model, ds, ["conv1", "layer1.1"], batch_size=4)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        conv1 = f["points/conv1"]  # 16x16 -> 4x4: each cell the mean of a 4x4 block
        assert conv1.shape == (5, 8, 4, 4) and conv1.dtype == np.float32
        blocks = ref["conv1"][:5].reshape(5, 8, 4, 4, 4, 4).mean(dim=(3, 5))
        np.testing.assert_allclose(conv1[:], blocks.numpy(), rtol=1e-5, atol=1e-6)
        assert conv1.attrs["pooling"] == "area"
        assert json.loads(conv1.attrs["stored_size"]) == [4, 4]
        assert json.loads(conv1.attrs["skip_point"])["size"] == [16, 16]
        layer = ref["layer1.1"][:5].reshape(5, 16, 4, 2, 4, 2).mean(dim=(3, 5))  # 8x8 -> 4x4
        np.testing.assert_allclose(f["points/layer1.1"][:], layer.numpy(), rtol=1e-5, atol=1e-6)
        assert f.attrs["max_size"] == 4 and f.attrs["num_samples"] == 5
        assert (f[schema.ABS_ERROR][:] == 0).all()  # float32 loses nothing
        assert f[schema.ABS_ERROR].attrs["statistic"] == "exact"
        assert [i.decode() for i in f[schema.IDS][:]] == ds.ids[:5]


def test_max_channels_stores_a_seeded_channel_subset_and_records_it(tmp_path):
    model = ft.TinyResNet()  # conv1: 8 channels, layer1.1: 16
    ds = arrays(n=5, size=32)
    kwargs = dict(spec=SPEC, batch_size=2, dtype="float32", num_workers=0, progress=False,
                  device="cpu")
    extract(model, ds, ["conv1", "layer1.1"], tmp_path / "c.h5", max_channels=10,
            channel_seed=3, **kwargs)
    ref = reference(model, ds, ["conv1", "layer1.1"], batch_size=2)
    with h5py.File(tmp_path / "c.h5", "r") as f:  # plain h5py: what a reader without featlab sees
        conv1, layer = f["points/conv1"], f["points/layer1.1"]
        np.testing.assert_array_equal(conv1[:], ref["conv1"].numpy())  # 8 <= 10: every channel
        assert "channels" not in conv1.attrs
        kept = json.loads(layer.attrs["channels"])
        assert len(kept) == 10 and kept == sorted(set(kept)) and 0 <= kept[0] < kept[-1] < 16
        assert kept != list(range(10))  # a random subset, not the first channels
        np.testing.assert_array_equal(layer[:], ref["layer1.1"][:, kept].numpy())
        settings = json.loads(f.attrs["settings"])
        assert (settings["max_channels"], settings["channel_seed"]) == (10, 3)
    cache = featlab.open_cache(tmp_path / "c.h5")
    assert cache.stored_channels("layer1.1").tolist() == kept
    assert cache.stored_channels("conv1").tolist() == list(range(8))
    assert summary(cache)["points"][1]["stored_channels"] == 10
    assert "10 of 16 channels" in repr(cache)
    assert "  command   none (made from Python)" in repr(cache).splitlines()
    cache.close()
    assert verify(tmp_path / "c.h5", progress=False).ok
    # the same seed, whatever else is extracted, keeps the same channels; another seed others
    extract(model, ds, ["layer1.1"], tmp_path / "d.h5", max_channels=10, channel_seed=3, limit=2,
            **kwargs)
    extract(model, ds, ["layer1.1"], tmp_path / "e.h5", max_channels=10, channel_seed=4, limit=2,
            **kwargs)
    with featlab.open_cache(tmp_path / "d.h5") as d, featlab.open_cache(tmp_path / "e.h5") as e:
        assert d.stored_channels("layer1.1").tolist() == kept
        assert e.stored_channels("layer1.1").tolist() != kept
    # pooled too: the subset is taken first, then pooled
    extract(model, ds, ["layer1.1"], tmp_path / "p.h5", max_channels=10, channel_seed=3,
            max_size=4, **kwargs)
    with h5py.File(tmp_path / "p.h5", "r") as f:
        pooled = ref["layer1.1"][:, kept].reshape(5, 10, 4, 2, 4, 2).mean(dim=(3, 5))
        np.testing.assert_allclose(f["points/layer1.1"][:], pooled.numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError,
                       match=r"`max_channels` \(--max-channels\) must be an int >= 0"):
        extract(model, ds, ["layer1.1"], tmp_path / "x.h5", max_channels=-1, **kwargs)


def test_a_partial_copy_left_beside_its_compressed_cache_is_removed(tmp_path, monkeypatch):
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=6)
    kwargs = dict(spec=SPEC, batch_size=4, num_workers=0, progress=False, compression="lzf")
    real = h5file.finalize

    def stopped_before_removal(partial, final, *args, **kw):  # killed after the rename
        os.link(partial, partial + ".kept")
        real(partial, final, *args, **kw)
        os.replace(partial + ".kept", partial)
        raise KeyboardInterrupt

    monkeypatch.setattr(h5file, "finalize", stopped_before_removal)
    with pytest.raises(KeyboardInterrupt):
        extract(model, ds, "all", tmp_path / "c.h5", **kwargs)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "c.h5.partial"]
    before = (tmp_path / "c.h5").read_bytes()
    with pytest.raises(CacheError, match="must not be a complete cache"):
        extract(model, ds, "all", tmp_path / "c.h5", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5"]  # the copy is gone
    assert (tmp_path / "c.h5").read_bytes() == before  # the cache untouched
    # a partial that is not a whole copy of the complete file is left alone
    extract(model, load_dataset("shapes", "val", size=32, length=5), "all",
            tmp_path / "other.h5", **{**kwargs, "compression": None})
    os.replace(tmp_path / "other.h5", tmp_path / "c.h5.partial")
    with pytest.raises(CacheError, match="must not be a complete cache"):
        extract(model, ds, "all", tmp_path / "c.h5", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "c.h5.partial"]


@pytest.mark.parametrize("compression", ["lzf", "gzip"])
def test_compression_is_applied_when_finalising_and_keeps_every_value(tmp_path, compression,
                                                                      monkeypatch):
    model = ft.TinyResNet()
    ds = load_dataset("shapes", "val", size=32, length=6)
    kwargs = dict(spec=SPEC, batch_size=4, num_workers=0, progress=False, save_images=True)
    extract(model, ds, "all", tmp_path / "plain.h5", **kwargs)
    # killed while compressing: the partial file stays, and the same call finishes the job
    real = h5file.copy_cache

    def killed(src, dst, *args, **kwargs):
        real(src, dst, *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(h5file, "copy_cache", killed)
    with pytest.raises(KeyboardInterrupt):
        extract(model, ds, "all", tmp_path / "c.h5", compression=compression, **kwargs)
    assert (tmp_path / "c.h5.partial").exists() and not (tmp_path / "c.h5").exists()
    monkeypatch.undo()
    again = extract(model, ds, "all", tmp_path / "c.h5", compression=compression, **kwargs)
    assert again.skipped == 6 and again.written == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.h5", "plain.h5"]
    with h5py.File(tmp_path / "plain.h5", "r") as a, h5py.File(tmp_path / "c.h5", "r") as b:
        names = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset)
                     else None)
        for name in names:  # plain h5py reads every value back, bit for bit
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
            assert dict(a[name].attrs) == dict(b[name].attrs), name
            assert b[name].chunks == a[name].chunks
        for name in ["labels", "images", *(f"points/{k}" for k in b["points"])]:
            assert b[name].compression == compression and a[name].compression is None
        # complete, settings, ...: the same record (two runs: started at other times)
        assert {k: v for k, v in a.attrs.items() if k not in ("created", "finished")} == {
            k: v for k, v in b.attrs.items() if k not in ("created", "finished")}
        # the session that finished each: all rows, or none (the first computed them all)
        assert [(r["rows"], r["of"]) for r in json.loads(a.attrs["finished"])] == [(6, 6)]
        assert [(r["rows"], r["of"]) for r in json.loads(b.attrs["finished"])] == [(0, 6)]
    info = summary(tmp_path / "c.h5")
    assert {p["compression"] for p in info["points"]} == {compression}
    assert info["file_size"] < (tmp_path / "plain.h5").stat().st_size
    assert f"({compression}-compressed)" in format_summary(info)
    assert verify(tmp_path / "c.h5", progress=False).ok
    with pytest.raises(ConfigError, match="`compression` must be one of none, lzf, gzip"):
        extract(model, ds, "all", tmp_path / "d.h5", compression="zstd", **kwargs)


@pytest.mark.parametrize("dtype", ["float16", "float32", "uint8"])
def test_parallel_gzip_chunks_read_back_as_h5py_writes_them(tmp_path, dtype):
    data = (np.random.default_rng(0).standard_normal((7, 3, 5)) * 50).astype(dtype)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        src = f.create_dataset("x", data=data, chunks=(3, 3, 5))  # 3 chunks, the last one short
        out = f.create_dataset("y", shape=data.shape, dtype=dtype, chunks=(3, 3, 5),
                               compression="gzip", shuffle=True)
        seen = []
        h5file._deflate_chunks(src, out, seen.append)
        ref = f.create_dataset("z", data=data, chunks=(3, 3, 5), compression="gzip", shuffle=True)
        assert sum(seen) == data.nbytes
        np.testing.assert_array_equal(out[()], data)
        assert out.id.get_storage_size() == ref.id.get_storage_size()  # the same deflate


def test_chunks_hold_whole_samples_and_batches(tmp_path):
    ds = load_dataset("shapes", "val", size=128, length=24)
    extract(ft.TinyResNet(), ds, "all", tmp_path / "c.h5", spec=SPEC, batch_size=8,
            num_workers=0, progress=False)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        for name, dset in f["points"].items():
            rows = dset.chunks[0]
            assert dset.chunks[1:] == dset.shape[1:], name  # a chunk is whole samples
            assert rows % 8 == 0 or 8 % rows == 0, name  # aligned with the batches
            assert dset.compression is None
            assert rows * dset[0].nbytes <= 4 * 2**20 or rows == 1, name
        assert f["points/conv1"].chunks[0] == 16  # 64 kB rows: two batches of 8 make 1 MiB
        assert f["points/layer1.1"].chunks[0] == 24  # 32 kB rows: 4 batches, capped at N = 24
        assert f[schema.LABELS].chunks == (24, 128, 128)  # 16 kB rows, capped at N


@pytest.mark.parametrize("error_stat", ["bound", "exact"])
def test_nonfinite_values_are_counted_reported_and_warned(tmp_path, error_stat):
    class Sqrt(nn.Module):
        def forward(self, x):
            return torch.sqrt(x)

    class NaNNet(nn.Module):  # sqrt of the channel sum: NaN wherever the sum is negative
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 2, 1)
            with torch.no_grad():
                self.conv.weight.fill_(1.0)
                self.conv.bias.zero_()
            self.sqrt = Sqrt()

        def forward(self, x):
            return self.sqrt(self.conv(x)).mean((2, 3))

    ds = arrays(n=5, size=8)
    ds.images[:] = 230
    ds.images[3] = 0  # normalized below zero: NaN in every value of sqrt for sample 3 only
    model = NaNNet()
    with pytest.warns(FeatlabWarning, match=r"'sqrt' in sample 'img003' \(128 values\)"):
        result = extract(model, ds, "all", tmp_path / "c.h5", spec=SPEC, batch_size=2,
                         error_stat=error_stat, num_workers=0, progress=False)
    assert result.nonfinite == (("sqrt", "img003", 128),)
    with h5py.File(tmp_path / "c.h5", "r") as f:
        counts = f[schema.NONFINITE][:]
        assert json.loads(f.attrs["point_names"]) == ["conv", "sqrt"]
        assert counts[:, 1].tolist() == [0, 0, 0, 2 * 8 * 8, 0] and (counts[:, 0] == 0).all()
        assert np.isnan(f["points/sqrt"][3]).all() and np.isfinite(f["points/sqrt"][[0, 4]]).all()
        assert np.isfinite(f[schema.ABS_ERROR][:]).all()  # measured over the finite values
        # sample 3 has none: no error, or the bound at 0 (float16's smallest spacing / 2)
        assert f[schema.ABS_ERROR][3, 1] == {"bound": 2.0 ** -25, "exact": 0.0}[error_stat]
        largest = float(f[schema.ABS_ERROR][:, 1].max())
    report = verify(tmp_path / "c.h5", progress=False)  # recomputes the bounds with numpy
    assert report.ok and any("sqrt: 128 non-finite" in n for n in report.notes), report.text()
    conv, sqrt = summary(tmp_path / "c.h5")["points"]  # what inspect shows per point
    assert (sqrt["nonfinite"], sqrt["max_abs_error"], sqrt["overflow_samples"]) == (
        128, largest, 0)
    assert conv["nonfinite"] == 0 and conv["max_abs_error"] > 0
    assert "128" in format_summary(summary(tmp_path / "c.h5")).splitlines()[7]


@pytest.mark.parametrize("error_stat", ["bound", "exact"])
def test_float16_overflow_is_counted_with_an_infinite_error(tmp_path, error_stat):
    class Big(nn.Module):
        def forward(self, x):
            return x * 1e5  # beyond float16's 65504 wherever |x| > 0.655

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = Big()

        def forward(self, x):
            return self.big(x).mean((2, 3))

    ds = arrays(n=2, size=4)
    with pytest.warns(FeatlabWarning, match="65504"):
        extract(Net(), ds, "all", tmp_path / "c.h5", spec=SPEC, error_stat=error_stat,
                num_workers=0, progress=False)
    x = SPEC.normalize(torch.stack([ds[i]["image"] for i in range(2)])) * 1e5
    with h5py.File(tmp_path / "c.h5", "r") as f:
        expected = (x.abs() > 65504).flatten(1).sum(1).tolist()
        assert f[schema.NONFINITE][:, 0].tolist() == expected and sum(expected) > 0
        assert np.isinf(f[schema.ABS_ERROR][:, 0]).all()
    assert verify(tmp_path / "c.h5", progress=False).ok
    (big,) = summary(tmp_path / "c.h5")["points"]
    assert (big["nonfinite"], big["max_abs_error"], big["overflow_samples"]) == (
        sum(expected), None, 2)
    assert "inf in 2" in format_summary(summary(tmp_path / "c.h5"))


def test_activations_float16_cannot_hold_are_reported_not_passed_as_precise(tmp_path):
    # a random-init MobileNet's last stage is ~1e-8: float16 stores zeros and subnormals, and the
    # absolute error recorded (2**-25) looks excellent
    class Scale(nn.Module):
        def __init__(self, factor):
            super().__init__()
            self.factor = factor

        def forward(self, x):
            return x * self.factor

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.plain, self.tiny, self.gone = Scale(1.0), Scale(1e-6), Scale(1e-9)

        def forward(self, x):
            return self.gone(self.tiny(self.plain(x))).mean((2, 3))

    ds = arrays(n=5, size=4)
    with pytest.warns(FeatlabWarning) as caught:
        result = extract(Net(), ds, "all", tmp_path / "c.h5", spec=SPEC, num_workers=0,
                         progress=False)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 2 and all("--dtype float32" in m for m in messages)
    assert "point 'gone': 5 of 5 samples hold no value in float16's normal range (every " \
           "|value| < 6.1e-05; 5 of them all zero)" in messages[0]
    assert "point 'tiny': 5 of 5 samples" in messages[1] and "0 of them all zero" in messages[1]
    assert result.underflow == (("tiny", 5, 0, 5), ("gone", 5, 5, 5))
    with h5py.File(tmp_path / "c.h5", "r") as f:  # what the message says, from the file
        tiny, gone = np.abs(f["points/tiny"][:]), f["points/gone"][:]
    assert (tiny < 2.0 ** -14).all() and (tiny > 0).any() and not gone.any()
    report = verify(tmp_path / "c.h5", progress=False)
    assert report.ok and sorted(n for n in report.notes if "normal range" in n) == [
        m.split(", ", 1)[1] for m in messages]
    # float32 keeps them: nothing to report
    result = extract(Net(), ds, "all", tmp_path / "f32.h5", spec=SPEC, dtype="float32",
                     num_workers=0, progress=False)
    assert result.underflow == ()


@pytest.mark.parametrize("exact", [False, True])
def test_the_device_statistic_agrees_with_numpy(exact):
    """``rounding_error``: what the hooks compute on a GPU (whole-tensor, no host sync), run
    here on CPU tensors with an overflow, a NaN and values below float16's normal range."""
    from featlab.cache.taps import rounding_error

    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    x *= torch.tensor([1.0, 100.0, 1e-6, 3.0])[:, None]
    x[1, 5], x[2, 7] = 1e5, float("nan")
    stored = x.half()
    got = rounding_error(x, stored, torch.isfinite(stored), exact).numpy()
    xs, hs = x.numpy(), stored.numpy()
    if exact:
        expected = np.where(np.isfinite(xs), np.abs(xs - hs.astype(np.float32)), 0).max(1)
    else:
        expected = np.spacing(np.where(np.isfinite(hs), np.abs(hs), 0).max(1)) \
            .astype(np.float32) / 2
    expected[1] = np.inf  # 1e5 overflowed
    np.testing.assert_array_equal(got, expected)
    assert np.isfinite(got[[0, 2, 3]]).all() and got[2] < 1e-7


def test_eval_mode_is_forced_checked_per_batch_and_restored(tmp_path):
    model = ft.TinyResNet().train()
    ds = arrays(n=4, size=16)
    extract(model, ds, "stages", tmp_path / "a.h5", spec=SPEC, batch_size=2, num_workers=0,
            progress=False)
    assert all(m.training for m in model.modules())  # left as it came
    ref = reference(model.eval(), ds, ["layer1.1"], batch_size=2)  # running BN statistics
    with h5py.File(tmp_path / "a.h5", "r") as f:
        np.testing.assert_array_equal(f["points/layer1.1"][:], ref["layer1.1"].half().numpy())

    class Sneaky(nn.Module):  # switches a module to training mode during its first forward
        def __init__(self):
            super().__init__()
            self.net = ft.TinyCNN()

        def forward(self, x):
            self.net.features[1].train()
            return self.net(x)

    with pytest.raises(ModelModeError, match="features.1"):
        extract(Sneaky(), ds, "stages", tmp_path / "b.h5", spec=SPEC, batch_size=2,
                num_workers=0, progress=False)


def test_spec_comes_from_the_model_or_must_be_given(tmp_path):
    model = ft.TinyCNN()
    ds = arrays(n=2, size=16)
    with pytest.raises(ConfigError, match="`spec` must give the normalization"):
        extract(model, ds, "stages", tmp_path / "a.h5", num_workers=0, progress=False)
    assert not list(tmp_path.iterdir())
    model.featlab_spec = SPEC
    result = extract(model, ds, "stages", tmp_path / "a.h5", num_workers=0, progress=False)
    with h5py.File(result.path, "r") as f:
        assert json.loads(f.attrs["model"]) == SPEC.to_dict()


def test_bad_inputs_fail_with_typed_errors(tmp_path):
    model = ft.TinyCNN()
    ds = arrays(n=2, size=16)
    loader = torch.utils.data.DataLoader(ds)
    with pytest.raises(ConfigError, match="not a DataLoader"):
        extract(model, loader, "stages", tmp_path / "a.h5", spec=SPEC)
    with pytest.raises(ConfigError, match="`dtype` must be one of float16, float32"):
        extract(model, ds, "stages", tmp_path / "a.h5", spec=SPEC, dtype="int8")
    with pytest.raises(featlab.errors.SkipPointNotFoundError, match="features.9"):
        extract(model, ds, "features.9", tmp_path / "a.h5", spec=SPEC, progress=False)
    with pytest.raises(ConfigError,
                       match=r"`batch_size` \(--batch-size\) must be an int >= 1; got .*Fix"):
        extract(model, ds, "stages", tmp_path / "a.h5", spec=SPEC, batch_size=0)


def test_samples_of_different_sizes_are_refused_one_native_size_is_stored(tmp_path):
    ds = arrays(n=4, size=16)
    sample = ds.sample
    ds.sample = lambda i: tuple(a[:12] for a in sample(i)) if i == 3 else sample(i)  # 12x16
    with pytest.raises(ConfigError, match="same size.*Fix: load the data set with size=S"):
        extract(ft.TinyCNN(), ds, "stages", tmp_path / "c.h5", spec=SPEC, batch_size=4,
                num_workers=0, progress=False)
    from featlab.data.fakes import write_voc

    write_voc(tmp_path / "voc", {"val": ["a", "b", "c"]}, size=(30, 44))
    voc = load_dataset("voc", "val", root=str(tmp_path / "voc"))  # native size, not square
    result = extract(ft.TinyCNN(), voc, "stages", tmp_path / "v.h5", spec=SPEC, num_workers=0,
                     progress=False)
    with h5py.File(result.path, "r") as f:
        assert f[schema.LABELS].shape == (3, 30, 44)
        assert json.loads(f.attrs["input_size"]) == [30, 44]


def test_progress_bar_shows_images_per_second_unless_turned_off(tmp_path, capsys, monkeypatch):
    ds = arrays(n=4, size=16)
    monkeypatch.delenv("FEATLAB_PROGRESS", raising=False)
    extract(ft.TinyCNN(), ds, "stages", tmp_path / "a.h5", spec=SPEC, num_workers=0)
    assert "4/4" in capsys.readouterr().err
    monkeypatch.setenv("FEATLAB_PROGRESS", "0")
    extract(ft.TinyCNN(), ds, "stages", tmp_path / "b.h5", spec=SPEC, num_workers=0)
    monkeypatch.delenv("FEATLAB_PROGRESS")
    extract(ft.TinyCNN(), ds, "stages", tmp_path / "c.h5", spec=SPEC, num_workers=0,
            progress=False)
    assert "4/4" not in capsys.readouterr().err
