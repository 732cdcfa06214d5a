"""`torchrun --nproc_per_node=2 -m featlab extract` (gloo, CPU) writes one cache in two shards;
`featlab merge` joins such shards into one file, or rebuilds the main file from shards
collected from several places, and refuses anything that is not one whole extraction."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import featlab
from featlab.cache.verify import verify
from featlab.cache.writer import estimate, extract
from featlab.data import load_dataset
from featlab.errors import CacheError

N = 30  # not a multiple of 2 x batch size: the shards get 15 samples each, batches of 4 + 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OPTIONS = {"plain": {}, "channel-subsets-gzip": {"max_channels": 100, "compression": "gzip"}}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """``run(key)``: ``(cache path, options, the --json result)`` of a 2-process extraction of
    N samples with ``OPTIONS[key]`` (each run once per module)."""
    runs = {}

    def run(key):
        if key not in runs:
            options = OPTIONS[key]
            out = tmp_path_factory.mktemp("torchrun") / "c.h5"
            torchrun = Path(sys.executable).with_name("torchrun")
            cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}", "-m",
                   "featlab", "extract", "--model", "resnet18", "--weights", "none",
                   "--data", "shapes",
                   "--input-size", "32", "--points", "stages", "--limit", str(N),
                   "--batch-size", "4", "--workers", "0", "--quiet", "--json", "--out", str(out)]
            cmd += [a for k, v in options.items() for a in (f"--{k.replace('_', '-')}", str(v))]
            env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            runs[key] = out, options, json.loads(done.stdout)  # printed by rank 0 only
        return runs[key]

    return run


@pytest.fixture(params=list(OPTIONS))
def sharded(request, two_ranks):
    return two_ranks(request.param)


@pytest.fixture
def plain(two_ranks):
    return two_ranks("plain")


@pytest.mark.slow
def test_two_processes_write_shards_read_as_one_cache_equal_to_one_process(sharded, tmp_path):
    out, options, result = sharded
    assert (result["num_samples"], result["written"], result["skipped"]) == (N, N, 0)

    model, spec = featlab.get_backbone("resnet18")
    ds = load_dataset("shapes", "val", size=32)
    single = extract(model, ds, "stages", tmp_path / "single.h5", spec=spec, batch_size=4,
                     limit=N, num_workers=0, progress=False, **options)
    shards = sorted(p.name for p in (out.parent / "c.h5.shards").iterdir())
    assert shards == ["rank-0-of-2.h5", "rank-1-of-2.h5"]
    with h5py.File(out, "r") as f, h5py.File(single.path, "r") as g:  # plain h5py, one file
        assert f["points/layer2.1"].is_virtual and f.attrs["world_size"] == 2
        assert bool(f.attrs["complete"]) and f.attrs["num_samples"] == N
        ids = [i.decode() for i in f["ids"][:]]
        assert ids == ds.ids[:N] and len(set(ids)) == N  # every sample exactly once, in order
        assert f["index"][:].tolist() == list(range(N)) and f["written"][:].all()
        assert json.loads(f.attrs["settings"])["world_size"] == 2
        # each shard's finishing session, one record per rank (15 + 15 rows, none resumed)
        assert [(r["rank"], r["rows"], r["of"]) for r in json.loads(f.attrs["finished"])] == [
            (0, 15, 15), (1, 15, 15)]
        assert "resumed" not in f.attrs
        np.testing.assert_array_equal(f["labels"][:], g["labels"][:])
        for name in g["points"]:
            np.testing.assert_allclose(f[f"points/{name}"][:].astype(np.float32),
                                       g[f"points/{name}"][:].astype(np.float32),
                                       rtol=1e-2, atol=1e-3, err_msg=name)
        np.testing.assert_array_equal(f["stats/nonfinite"][:], g["stats/nonfinite"][:])
        # channel subsets: each shard keeps the same channels, and the virtual file says which
        assert ("channels" in f["points/layer4.1"].attrs) == bool(options)
        if options:
            assert f["points/layer4.1"].attrs["channels"] == g["points/layer4.1"].attrs["channels"]
    with h5py.File(out.parent / "c.h5.shards" / "rank-0-of-2.h5", "r") as f:
        assert f["points/layer4.1"].compression == options.get("compression")
    with h5py.File(out.parent / "c.h5.shards" / "rank-1-of-2.h5", "r") as f:
        assert json.loads(f.attrs["shard"]) == {"rank": 1, "world_size": 2, "start": 15,
                                                "stop": N}
        assert f["index"][:].tolist() == list(range(15, N))
    for rank in (0, 1):  # a shard verifies on its own (its ids_sha256 is the whole cache's)
        report = verify(out.parent / "c.h5.shards" / f"rank-{rank}-of-2.h5")
        assert report.ok and report.complete, report.text()
    # the cache and its shards move together: the virtual sources are relative paths
    moved = tmp_path / "moved"
    shutil.copytree(out.parent, moved)
    with featlab.open_cache(moved / "c.h5") as cache:
        assert len(cache) == N and cache.ids == ds.ids[:N]
    # ... but keep their names: the file reads the folder it was written with
    os.rename(moved / "c.h5", moved / "e.h5")
    os.rename(moved / "c.h5.shards", moved / "e.h5.shards")
    with pytest.raises(CacheError, match=r"reads from missing .*Fix: put the shards back in "
                                         r"'c\.h5\.shards' next to it \(its name when extracted\)"):
        featlab.open_cache(moved / "e.h5")
    # a truncated shard is named, in one line, by the reader and by verify
    damaged = tmp_path / "damaged"
    shutil.copytree(out.parent, damaged)
    shard = damaged / "c.h5.shards" / "rank-1-of-2.h5"
    os.truncate(shard, shard.stat().st_size // 2)
    note = (f"its shard {shard} cannot be opened. Fix: restore it; or delete it and c.h5, and "
            "re-run the same torchrun extraction, which keeps the other shards; or re-extract.")
    with pytest.raises(CacheError) as err:
        featlab.open_cache(damaged / "c.h5")
    assert str(err.value).endswith(note) and "\n" not in str(err.value)
    report = verify(damaged / "c.h5")
    assert not report.ok and report.problems[-1].message.endswith(note)


def _names(f):
    names = []
    f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return sorted(names)


def _merge(capsys, *argv):
    from featlab.cli import main

    code = main(["merge", *map(str, argv), "--quiet"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_merge_copies_the_shards_into_one_file_that_reads_as_the_sharded_cache(sharded, tmp_path,
                                                                              capsys):
    out, options, _ = sharded
    code, stdout, err = _merge(capsys, out, "--out", tmp_path / "one.h5", "--json")
    assert code == 0, err
    result = json.loads(stdout)
    assert result["num_samples"] == N and not result["virtual"]
    assert [Path(p).name for p in result["shards"]] == ["rank-0-of-2.h5", "rank-1-of-2.h5"]
    assert result["compression"] == options.get("compression")  # the shards' own, by default
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "one.h5", "r") as b:
        assert _names(a) == _names(b)
        for name in _names(a):  # plain h5py: every value and attribute, bit for bit
            assert not b[name].is_virtual, name
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
            assert dict(a[name].attrs) == dict(b[name].attrs), name
            assert b[name].dtype == a[name].dtype, name
        assert dict(a.attrs) == dict(b.attrs)  # complete, N samples, world size 2
        for name in ["labels", *(f"points/{k}" for k in b["points"])]:
            assert b[name].compression == options.get("compression"), name
            assert b[name].chunks[1:] == b[name].shape[1:], name  # whole samples per chunk
    # self-contained: it opens alone, far from the shards
    alone = tmp_path / "elsewhere" / "one.h5"
    alone.parent.mkdir()
    (tmp_path / "one.h5").rename(alone)
    with featlab.open_cache(alone) as cache, featlab.open_cache(out) as ref:
        assert cache.ids == ref.ids and cache.complete and cache.world_size == 2
        assert cache.finished == ref.finished and len(cache.finished) == 2
        name = cache.points[-1].name
        np.testing.assert_array_equal(cache[name][:], ref[name][:])
        np.testing.assert_array_equal(cache.stored_channels(name), ref.stored_channels(name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere"]  # no temporary left
    assert verify(alone, progress=False).ok
    # another compression: every chunk decoded and compressed again (the merge above copied
    # the chunks as stored wherever they lined up)
    assert _merge(capsys, out.parent / "c.h5.shards", "--out", tmp_path / "lzf.h5",
                  "--compression", "lzf")[0] == 0
    with h5py.File(out, "r") as a, h5py.File(tmp_path / "lzf.h5", "r") as b:
        for name in _names(a):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)
        assert b["labels"].compression == "lzf" and b["points/layer4.1"].compression == "lzf"


@pytest.mark.slow
def test_merge_virtual_joins_shards_gathered_from_several_nodes(plain, tmp_path, capsys):
    # as after a run on two nodes without a shared file system: each kept its rank's shard
    out = plain[0]
    for r, node in enumerate(["node-a", "node-b"]):
        (tmp_path / node).mkdir()
        shutil.copy(out.parent / "c.h5.shards" / f"rank-{r}-of-2.h5", tmp_path / node)
    resumed = [{"rank": 1, "skipped": 4, "of": 15, "device": "cpu"}]  # as if rank 1 had resumed
    with h5py.File(tmp_path / "node-b" / "rank-1-of-2.h5", "r+") as f:
        f.attrs["resumed"] = json.dumps(resumed)
    code, printed, err = _merge(capsys, tmp_path / "node-b", tmp_path / "node-a", "--virtual",
                                "--out", tmp_path / "c.h5")
    assert code == 0, err
    assert printed.startswith(f"{tmp_path / 'c.h5'}: {N} samples, virtual datasets over 2 shards")
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f["points/layer2.1"].is_virtual and os.path.getsize(tmp_path / "c.h5") < 100_000
    with featlab.open_cache(tmp_path / "c.h5") as cache, featlab.open_cache(out) as ref:
        assert cache.ids == ref.ids and cache.complete
        assert cache.resumed == resumed and ref.resumed is None  # every shard's, not rank 0's
        np.testing.assert_array_equal(cache["layer2.1"][:], ref["layer2.1"][:])
        np.testing.assert_array_equal(cache.labels[:], ref.labels[:])


def _broken(tmp_path, out, change):
    """A copy of the plain run's shard folder, changed by ``change(folder)``."""
    folder = tmp_path / "c.h5.shards"
    shutil.copytree(out.parent / "c.h5.shards", folder)
    change(folder)
    return folder


def _set_attr(path, key, update):
    with h5py.File(path, "r+") as f:
        f.attrs[key] = json.dumps({**json.loads(f.attrs[key]), **update})


def _shift(path):
    with h5py.File(path, "r+") as f:
        f.attrs["shard"] = json.dumps({**json.loads(f.attrs["shard"]), "start": 14, "stop": 29})
        f["index"][:] = np.arange(14, 29)


def _rename_id(path):
    with h5py.File(path, "r+") as f:
        f["ids"][0] = b"val/other"


@pytest.mark.slow
@pytest.mark.parametrize("change, message", [
    (lambda d: (d / "rank-1-of-2.h5").unlink(),
     r"every rank's shard must be there; 1 of 2 missing \(rank-1-of-2\.h5\)"),
    (lambda d: (d / "rank-1-of-2.h5").rename(d / "rank-1-of-2.h5.partial"),
     r"every shard must be complete; .*rank-1-of-2\.h5\.partial is still partial"),
    (lambda d: _set_attr(d / "rank-1-of-2.h5", "settings", {"dtype": "float32"}),
     r"every shard must come from one extraction; .*rank-1-of-2\.h5 differs .* in `--dtype`: "
     r"float16 there, float32 here"),
    (lambda d: _rename_id(d / "rank-1-of-2.h5"), r"sample ids must be the 30 distinct ids"),
    (lambda d: _shift(d / "rank-1-of-2.h5"),
     r"must hold samples \[15, 30\) of 30 \(rank 1 of 2\); it holds \[14, 29\)"),
], ids=["missing", "partial", "other-run", "ids", "range"])
def test_merge_refuses_what_is_not_one_whole_extraction(plain, tmp_path, capsys, change,
                                                       message):
    out = plain[0]
    folder = _broken(tmp_path, out, change)
    code, _, err = _merge(capsys, folder, "--out", tmp_path / "m.h5")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "m.h5").exists()
    # rank 0 of an extraction runs the same checks before it joins the shards
    if os.path.isfile(folder / "rank-0-of-2.h5"):
        from featlab.cache.files import shard_path
        from featlab.cache.merge import assemble

        with pytest.raises(CacheError, match=message):
            assemble([shard_path(str(tmp_path / "c.h5"), r, 2) for r in range(2)],
                     str(tmp_path / "c.h5"))
        assert not (tmp_path / "c.h5").exists()


@pytest.mark.slow
def test_merge_never_overwrites_and_names_a_rank_given_twice(plain, tmp_path, capsys):
    out = plain[0]
    shards = out.parent / "c.h5.shards"
    (tmp_path / "copy").mkdir()
    shutil.copy(shards / "rank-0-of-2.h5", tmp_path / "copy")
    code, _, err = _merge(capsys, shards, tmp_path / "copy", "--out", tmp_path / "m.h5")
    assert code == 2 and re.search(r"rank 0 is both .*rank-0-of-2\.h5 and .*rank-0-of-2\.h5", err)
    code, _, err = _merge(capsys, shards / "rank-0-of-2.h5", "--out", shards / "rank-0-of-2.h5")
    assert code == 2 and "`out` must not be one of the shards" in err
    code, _, err = _merge(capsys, out, "--out", out)  # the sharded cache's own main file
    assert code == 2 and "must not be a complete cache unless --force" in err
    with h5py.File(out, "r") as f:
        assert f["points/layer2.1"].is_virtual  # untouched
    single = tmp_path / "single.h5"
    shutil.copy(out, single)
    code, _, err = _merge(capsys, shards, "--out", single, "--virtual", "--compression", "gzip")
    assert code == 2 and "`--compression` needs a copy" in err
    code, _, err = _merge(capsys, shards, "--out", single, "--force")
    assert code == 0, err
    code, _, err = _merge(capsys, single, "--out", tmp_path / "again.h5")
    assert code == 2 and "it is a whole cache. Fix: it needs no merge" in err


SLOW_RANK = """
import os, sys, time
import featlab
from featlab.data import load_dataset

ds = load_dataset("shapes", "val", size=32, length=8)
plain = type(ds).__getitem__

def getitem(self, i):  # rank 1's samples (4..7) are slow on the first run
    if i >= 4 and os.environ.get("SLOW") == "1":
        time.sleep(4.0)
    return plain(self, i)

ds.__class__ = type("Slow", (type(ds),), {"__getitem__": getitem})
model, spec = featlab.get_backbone("resnet18")
featlab.extract(model, ds, "stages", sys.argv[1], spec=spec, batch_size=2, num_workers=0,
                progress=False)
"""


@pytest.mark.slow
def test_a_rank_left_waiting_past_the_timeout_says_how_to_wait_longer(tmp_path, monkeypatch):
    script = tmp_path / "slow_rank.py"
    script.write_text(SLOW_RANK)
    out = tmp_path / "c.h5"
    torchrun = Path(sys.executable).with_name("torchrun")

    def run(slow):
        cmd = [str(torchrun), "--nproc_per_node=2", f"--master_port={free_port()}",
               str(script), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0", "SLOW": slow}
        if slow == "1":  # only there; long enough for ranks that start seconds apart when
            env["FEATLAB_DIST_TIMEOUT"] = "8"  # the machine is loaded (init waits on it too)
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    done = run("1")  # rank 0 finishes its shard ~16 s before rank 1
    assert done.returncode != 0
    assert "every rank must reach this point within 8 s" in done.stderr
    assert "FEATLAB_DIST_TIMEOUT=SECONDS larger" in done.stderr
    # a dry run of each rank says what it would do: rank 0 keeps its finished shard
    model, spec = featlab.get_backbone("resnet18")
    ds = load_dataset("shapes", "val", size=32, length=8)
    shards = tmp_path / "c.h5.shards"
    for rank, expected in ((0, f"resume {shards / 'rank-0-of-2.h5'}: 4 of 4 samples written, "
                               "only finishing it left"),
                           (1, f"resume {shards / 'rank-1-of-2.h5.partial'}: ")):
        for key, value in (("RANK", rank), ("LOCAL_RANK", rank), ("WORLD_SIZE", 2),
                           ("LOCAL_WORLD_SIZE", 2)):
            monkeypatch.setenv(key, str(value))
        note = estimate(model, ds, "stages", out, spec=spec, num_workers=0).existing
        assert note.startswith(f"the run would {expected}"), note
    monkeypatch.undo()
    done = run("0")  # the same job again: the finished shard is kept, the other resumes
    assert done.returncode == 0, done.stderr[-3000:]
    assert verify(out).ok
