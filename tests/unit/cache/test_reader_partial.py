"""open_cache on caches still being written: only flagged rows, snapshots, refresh(), a live
writer in another process, and the final rename."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from featlab import runinfo
from featlab.cache import _reading, h5file, schema
from featlab.cache.reader import open_cache
from featlab.cache.summary import summary
from featlab.cache.verify import verify
from featlab.errors import CacheError, FeatlabWarning

# A writer that follows the schema's order with plain h5py: rows, flush, flags, flush.
WRITER = textwrap.dedent("""
    import os, sys
    import h5py, numpy as np
    path, npz = sys.argv[1], np.load(sys.argv[2])
    f = h5py.File(path, "r+", locking=False)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *rows = line.split()
        rows = [int(r) for r in rows] or list(np.flatnonzero(f["written"][()] == 0))
        for r in rows:
            for key in npz.files:
                f[key.replace(":", "/")][r] = npz[key][r]
        f.flush()
        for r in rows:
            f["written"][r] = 1
        f.flush()
        if cmd == "finish":
            f.attrs["complete"] = True
            f.close()
            os.replace(path, path[:-len(".partial")])
        print("done", flush=True)
        if cmd == "finish":
            break
""")


# A session that resumes a partial cache records itself in it (what featlab.extract does before
# its first batch), here over and over.
SESSIONS = textwrap.dedent("""
    import sys
    from featlab.cache import h5file
    print("ready", flush=True)
    for _ in range(int(sys.argv[2])):
        h5file.record_resume(sys.argv[1], 0, 6, 12, "cpu")
""")


def _expect_rows(cache, exp, rows):
    assert cache.ids == [exp.ids[r] for r in rows]
    np.testing.assert_array_equal(cache.rows, rows)
    np.testing.assert_array_equal(cache.index, exp.index[rows])
    for p in exp.points:
        np.testing.assert_array_equal(cache[p.name][:], exp.arrays[p.name][rows])
    np.testing.assert_array_equal(cache.labels[:], exp.labels[rows])
    np.testing.assert_array_equal(cache.images[:], exp.images[rows])


def test_partial_cache_exposes_only_flagged_rows(partial_cache):
    exp = partial_cache
    final = str(exp.path)[:-len(schema.PARTIAL_SUFFIX)]
    for given in (final, exp.path):  # the final name (not there yet) or the .partial itself
        cache = open_cache(given)
        assert cache.path == exp.path and not cache.complete
        assert len(cache) == 6 and cache.num_samples == 12
        _expect_rows(cache, exp, exp.rows)
        # reader row i is file row rows[i]
        np.testing.assert_array_equal(cache["conv1"][[5, 0]], exp.arrays["conv1"][[9, 0]])
        got = np.concatenate([b["layer1.1"] for b in cache.batches("layer1.1", batch_size=4)])
        np.testing.assert_array_equal(got, exp.arrays["layer1.1"][exp.rows])
        cache.close()
    info = summary(cache)
    assert (info["written"], info["total"], info["complete"], info["in_progress"]) == (
        6, 12, False, True)
    assert "in progress: 6 of 12 samples written" in repr(cache)
    assert "6 of 12" in cache._repr_html_()


def test_reading_while_a_writer_is_active_then_refresh_and_rename(partial_cache, tmp_path):
    exp = partial_cache
    npz = tmp_path / "rows.npz"
    arrays = {f"points:{k}": v for k, v in exp.arrays.items()}
    np.savez(npz, labels=exp.labels, images=exp.images, **arrays)
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(exp.path), str(npz)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "ready"
        cache = open_cache(exp.path)  # the writer holds the file open in r+
        assert len(cache) == 6
        np.testing.assert_array_equal(cache["conv1"][2], exp.arrays["conv1"][2])  # caches the
        # chunk of rows 0-3, whose row 3 is still junk

        writer.stdin.write("write 3 4\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "done"
        assert len(cache) == 6  # a snapshot until refresh()
        # a new reader sees the new rows, with `cache` still open in this process (HDF5 shares
        # one open file per process, chunk caches included)
        _expect_rows(open_cache(exp.path), exp, [0, 1, 2, 3, 4, 5, 6, 9])
        cache.refresh()
        _expect_rows(cache, exp, [0, 1, 2, 3, 4, 5, 6, 9])  # row 3 not served stale

        writer.stdin.write("finish\n")
        writer.stdin.flush()
        assert writer.stdout.readline().strip() == "done"
        assert writer.wait(timeout=60) == 0
    finally:
        if writer.poll() is None:
            writer.kill()
    assert not exp.path.exists()
    cache.refresh()  # the .partial was renamed: the reader follows it
    assert cache.path.name == "val.h5" and cache.complete
    _expect_rows(cache, exp, np.arange(12))


@pytest.mark.slow
def test_a_partial_cache_opens_at_any_instant_while_sessions_record_themselves_in_it(
        partial_cache, tmp_path):
    # Before the records were rewritten in place, each one changed the file's metadata, which
    # HDF5 writes in pieces: plain h5py opens failed with "truncated file" (10-14 over these 200
    # records) and reads of the root attributes with "actual len exceeds EOA"
    path = str(partial_cache.path)
    script = tmp_path / "sessions.py"
    script.write_text(SESSIONS)
    writer = subprocess.Popen([sys.executable, str(script), path, "200"], stdout=subprocess.PIPE,
                              text=True)
    opens, failures = 0, []
    try:
        assert writer.stdout.readline().strip() == "ready"
        while writer.poll() is None:
            try:
                with open_cache(path) as cache:
                    assert len(cache) == 6
                with h5py.File(path, "r", locking=False) as f:  # plain h5py
                    assert f["written"][()].sum() == 6
                    resumed = f.attrs["resumed"]
                    assert not resumed or json.loads(resumed)[-1]["skipped"] == 6
                opens += 2
            except (OSError, CacheError) as err:
                failures.append(str(err))
    finally:
        writer.wait(timeout=120)
    assert writer.returncode == 0
    assert opens >= 200 and not failures, f"{len(failures)} of {opens + len(failures)} opens " \
        f"failed: {failures[:2]}"
    with h5py.File(path, "r") as f:  # the latest records that fit in its fixed size
        kept = json.loads(f.attrs["resumed"])
        assert 40 < len(kept) < 200 and f.attrs.get_id("resumed").dtype.itemsize == 32768


def _changed_bytes(path, change):
    before = open(path, "rb").read()
    change()
    after = open(path, "rb").read()
    assert len(after) == len(before)
    return np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))


def test_a_session_record_rewrites_only_its_attribute_value(partial_cache, tmp_path):
    path = str(partial_cache.path)
    with h5py.File(path, "r") as f:
        assert f.attrs["resumed"] == b"" and f.attrs["finished"] == b""
    with open_cache(path) as cache:  # empty: no session recorded
        assert cache.resumed is None and cache.finished is None
    changed = _changed_bytes(path, lambda: h5file.record_resume(path, 0, 6, 12, "cpu"))
    with h5py.File(path, "r") as f:
        record = f.attrs["resumed"]
    # one run of bytes, the value itself: no header, heap or superblock changed
    assert 0 < changed[-1] - changed[0] < len(record) + 1
    with open_cache(path) as cache:
        assert [(r["skipped"], r["of"]) for r in cache.resumed] == [(6, 12)]


def test_finalising_rewrites_only_the_values_of_complete_and_finished(make_cache):
    path = str(make_cache("val.h5" + schema.PARTIAL_SUFFIX, complete=False).path)
    final = path[:-len(schema.PARTIAL_SUFFIX)]
    before = np.fromfile(path, np.uint8)
    h5file.finalize(path, final, finished=h5file.finished_record(0, 12, 12, "cpu"))
    after = np.fromfile(final, np.uint8)
    with h5py.File(final, "r") as f:
        assert f.attrs["complete"] and json.loads(f.attrs["finished"])[0]["rows"] == 12
        record = f.attrs["finished"]
    assert len(after) == len(before) and not os.path.exists(path)
    assert 0 < np.count_nonzero(before != after) <= len(record) + 1  # the record, complete's 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names an fd through /proc")
@pytest.mark.parametrize("compression", [None, "lzf"])
def test_a_finalised_cache_is_on_disk_before_it_is_complete_and_renamed(make_cache, monkeypatch,
                                                                         compression):
    # a machine that crashes after featlab reports a cache complete must keep all of it
    path = str(make_cache("val.h5" + schema.PARTIAL_SUFFIX, complete=False).path)
    final = path[:-len(schema.PARTIAL_SUFFIX)]
    synced, real = [], os.fsync

    def fsync(fd):
        name = os.readlink(f"/proc/self/fd/{fd}")
        state = (h5py.File(name, "r", locking=False).attrs["complete"]
                 if os.path.isfile(name) else os.path.exists(final))
        synced.append((os.path.basename(name), bool(state)))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    h5file.finalize(path, final, compression=compression)
    folder = os.path.basename(os.path.dirname(path))
    if compression is None:  # the rows, then the flag, then the rename
        assert synced == [("val.h5.partial", False), ("val.h5.partial", True), (folder, True)]
    else:  # the compressed copy, made complete, then the rename
        assert synced == [("val.h5" + schema.COMPRESSING_SUFFIX, True), (folder, True)]


def test_the_oldest_session_records_make_room_for_the_newest(partial_cache, caplog):
    path = str(partial_cache.path)
    with h5py.File(path, "r+") as f:  # room for about three records
        del f.attrs["resumed"]
        f.attrs.create("resumed", b"", dtype=h5py.string_dtype("ascii", 1400))
    for skipped in range(5):
        h5file.record_resume(path, 0, skipped, 12, "cpu")
    with open_cache(path) as cache:
        kept = [r["skipped"] for r in cache.resumed]
    assert 1 < len(kept) < 5 and kept == list(range(5 - len(kept), 5))
    assert "oldest were dropped" in caplog.text


def test_a_long_command_line_is_shortened_in_a_session_record(partial_cache):
    runinfo.command_line(["extract", "--points", ",".join(f"layer{i}" for i in range(3000))])
    try:
        h5file.record_resume(str(partial_cache.path), 0, 6, 12, "cpu")
    finally:
        runinfo.command_line(None)
    with open_cache(partial_cache.path) as cache:
        (record,) = cache.resumed
    assert record["versions"]["command"].endswith("characters)")
    assert len(json.dumps(record)) < 3000


def test_a_partial_cache_of_an_earlier_featlab_gets_its_first_record(partial_cache):
    path = str(partial_cache.path)
    with h5py.File(path, "r+") as f:  # made before the records had a fixed size
        del f.attrs["resumed"]
    h5file.record_resume(path, 0, 6, 12, "cpu")
    with open_cache(path) as cache:
        assert [r["skipped"] for r in cache.resumed] == [6]


@pytest.fixture(params=["unreadable", "half-written"])
def torn_resumed(request, partial_cache, monkeypatch):
    """A ``resumed`` record a kill tore: half of its new value over the old one (a kill between
    the pages of the in-place write), or unreadable, as HDF5 could leave an attribute whose
    header write a kill interrupted (before the records were written in place: 1-2 of 150
    random kills of a process rewriting one in a loop)."""
    path = str(partial_cache.path)
    h5file.record_resume(path, 0, 6, 12, "cpu")
    if request.param == "half-written":
        with h5py.File(path, "r+") as f:
            value = f.attrs["resumed"]
            f.attrs.modify("resumed", value[:len(value) // 2])
        return path
    real = h5py.AttributeManager.__getitem__

    def getitem(self, name):
        if name == "resumed":
            raise OSError("Can't synchronously read data (len not positive after adjustment "
                          "for EOA)")
        return real(self, name)

    monkeypatch.setattr(h5py.AttributeManager, "__getitem__", getitem)
    return path


def test_a_torn_session_record_leaves_the_cache_readable_and_resumable(torn_resumed, caplog):
    path = torn_resumed
    with open_cache(path) as cache:  # the rows do not depend on it
        assert len(cache) == 6 and cache.resumed is None
        assert "resumed" not in summary(cache) or summary(cache)["resumed"] is None
    problems = verify(path, progress=False).problems
    assert [p.message for p in problems if "'resumed'" in p.message] == [
        "root attribute 'resumed' must be readable JSON; it is not (a session was killed as it "
        "wrote it). The samples do not depend on it. Fix: none is needed; a session that "
        "resumes or finishes the cache writes it again."]
    with caplog.at_level("WARNING", logger="featlab"):
        h5file.record_resume(path, 0, 6, 12, "cpu")  # the next session starts the list again
    assert "cannot be read" in caplog.text


@pytest.mark.parametrize("read", ["open_cache", "verify"])
def test_a_partial_cache_renamed_as_it_is_opened_is_read_under_its_final_name(make_cache,
                                                                               monkeypatch, read):
    path = make_cache("val.h5" + schema.PARTIAL_SUFFIX, complete=True).path
    final = str(path)[:-len(schema.PARTIAL_SUFFIX)]
    real = _reading.resolve_cache_path

    def resolve_then_finish(given, **kwargs):  # the writer renames the file found at once
        found = real(given, **kwargs)
        if found.exists() and found.name.endswith(schema.PARTIAL_SUFFIX):
            os.replace(found, final)
        return found

    monkeypatch.setattr(_reading, "resolve_cache_path", resolve_then_finish)
    if read == "verify":  # before, both failed: "must be an HDF5 file ... No such file"
        report = verify(str(path), progress=False)
        assert report.path == final and report.ok and report.complete
        return
    with open_cache(path) as cache:
        assert str(cache.path) == final and cache.complete and len(cache) == 12


def test_marked_complete_with_unflagged_rows_warns(make_cache):
    exp = make_cache(written=np.arange(12) != 4, complete=True)
    with pytest.warns(FeatlabWarning, match="only 11 of 12"):
        cache = open_cache(exp.path)
    assert 4 not in cache.rows and len(cache) == 11


def test_refresh_refuses_a_replaced_cache(make_cache):
    cache = open_cache(make_cache("val.h5").path)
    make_cache("val.h5", ids=[f"other/{i}" for i in range(12)])
    with pytest.raises(CacheError, match="replaced by another cache"):
        cache.refresh()


def test_partial_file_is_readable_with_plain_h5py(partial_cache):
    with h5py.File(partial_cache.path, "r") as f:
        rows = np.flatnonzero(f["written"][()] == 1)
        np.testing.assert_array_equal(rows, partial_cache.rows)
        np.testing.assert_array_equal(f["points/layer1.0"][rows],
                                      partial_cache.arrays["layer1.0"][rows])
