"""featlab verify: clean caches pass; each kind of damage is found, named and located."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from featlab import cli
from featlab.cache import schema
from featlab.cache.verify import VerifyReport, verify
from featlab.errors import CacheError


def _checks(report: VerifyReport) -> list[str]:
    return [p.check for p in report.problems]


def test_clean_caches_pass(complete_cache, distributed_cache, make_cache):
    for exp in (complete_cache, distributed_cache, make_cache("pooled.h5", max_size=4,
                                                              dtype="float16")):
        report = verify(exp.path, progress=False)
        assert report.ok, report.text()
        assert (report.written, report.total, report.complete) == (12, 12, True)
        assert report.text().startswith(f"OK: {exp.path}")
    # everything was read once: ids, flags, every point, labels and images
    arrays = complete_cache.arrays
    data = sum(a.nbytes for a in arrays.values()) + complete_cache.labels.nbytes + \
        complete_cache.images.nbytes
    assert verify(complete_cache.path, progress=False).bytes_read == data + 12 + 12 * 13


def test_small_blocks_give_the_same_result(make_cache):
    exp = make_cache()
    with h5py.File(exp.path, "r+") as f:
        f["points/layer1.1"][7, 2, 1, 1] = np.nan  # not recorded in /stats/nonfinite
    whole = verify(exp.path, progress=False)
    small = verify(exp.path, progress=False, block_bytes=1)  # one row at a time
    assert whole.problems == small.problems and whole.bytes_read == small.bytes_read


def test_nan_not_in_stats_is_a_problem_naming_point_and_sample(complete_cache):
    with h5py.File(complete_cache.path, "r+") as f:
        f["points/layer1.0"][5, 0, 3, 3] = np.nan
        f["points/layer1.0"][5, 1, 0, 0] = np.inf
    report = verify(complete_cache.path, progress=False)
    assert _checks(report) == ["nonfinite"]
    msg = report.problems[0].message
    assert "layer1.0" in msg and "'val/s0/000005'" in msg and "2 counted, 0 recorded" in msg
    assert "1 problem(s)" in report.text() and "[nonfinite]" in report.text()


def test_recorded_nan_is_a_note_not_a_problem(complete_cache):
    with h5py.File(complete_cache.path, "r+") as f:
        f["points/conv1"][2, 0, 0, 0] = np.nan
        f["stats/nonfinite"][2, 0] = 1
    report = verify(complete_cache.path, progress=False)
    assert report.ok
    assert any("conv1: 1 non-finite" in n and "'val/s0/000002'" in n for n in report.notes)


def _wrong_channels(f):
    attrs = dict(f["points/layer1.1"].attrs)
    del f["points/layer1.1"]
    dset = f.create_dataset("points/layer1.1", data=np.zeros((12, 15, 4, 4), "float32"))
    dset.attrs.update(attrs)


def _set_attr(key, value):
    def corrupt(f):
        f.attrs[key] = value
    return corrupt


def _flag(row, value):
    def corrupt(f):
        f["written"][row] = value
    return corrupt


CORRUPTIONS = {
    "wrong shape": (_wrong_channels, "shape", ["/points/layer1.1 must be 12x16x4x4",
                                               "12x15x4x4"]),
    "missing attr": (lambda f: f.attrs.__delitem__("versions"), "metadata", ["['versions']"]),
    "attr not JSON": (_set_attr("versions", "torch 2.14 {"), "metadata",
                      ["'versions' must be JSON", "'torch 2.14 {'"]),
    "flag vs complete": (_flag(4, 0), "completeness", ["11 of 12", "'val/s0/000004'",
                                                         "re-extract with --force"]),
    "odd flag": (_flag(2, 3), "completeness completeness", ["0 or 1", "'val/s0/000002' = 3"]),
    "complete=False under final name": (_set_attr("complete", False), "completeness",
                                        ["complete=False", "re-extract with --force"]),
    "ids sha256": (_set_attr("ids_sha256", "0" * 64), "metadata", ["recomputed"]),
    # /stats/* columns then disagree with point_names too
    "point_names vs /points": (_set_attr("point_names", json.dumps(["conv1", "layer1.1"])),
                               "metadata shape shape", ["point_names", "layer1.0"]),
    "execution order": (_set_attr("point_names", json.dumps(["layer1.0", "conv1", "layer1.1"])),
                        "metadata", ["execution order", "[3, 0, 4]"]),
    "stored_size vs size": (lambda f: f["points/conv1"].attrs.__setitem__(
        "stored_size", json.dumps([4, 4])), "shape shape", ["stored_size", "[8, 8]"]),
    "channels not increasing": (lambda f: f["points/layer1.1"].attrs.__setitem__(
        "channels", json.dumps([3, 1])), "metadata", ["/points/layer1.1 channels", "[3, 1]"]),
    "missing point attr": (lambda f: f["points/conv1"].attrs.__delitem__("pooling"),
                           "metadata", ["/points/conv1", "['pooling']"]),
    "label out of range": (lambda f: f["labels"].__setitem__((3, 5, 5), 9), "labels",
                           ["'val/s0/000003' with 9"]),
    "missing dataset": (lambda f: f.__delitem__("stats/abs_error"), "metadata",
                        ["/stats/abs_error"]),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_each_damage_is_found(make_cache, name):
    corrupt, checks, words = CORRUPTIONS[name]
    exp = make_cache()
    with h5py.File(exp.path, "r+") as f:
        corrupt(f)
    report = verify(exp.path, progress=False)
    assert _checks(report) == checks.split(), report.text()
    for word in words:
        assert word in report.problems[0].message, (word, report.problems[0].message)
    assert "Fix:" in report.problems[0].message and "\n" not in report.problems[0].message
    assert json.loads(json.dumps(report.to_dict()))["ok"] is False


def test_partial_cache_checks_written_rows_only(partial_cache):
    report = verify(partial_cache.path, progress=False)  # junk in unflagged rows is fine
    assert report.ok and not report.complete and (report.written, report.total) == (6, 12)
    assert any("in progress: 6 of 12" in n for n in report.notes)


def test_the_bar_of_a_partial_cache_ends_at_its_total(partial_cache, monkeypatch):
    # unwritten rows are skipped, not read; the bar counts them as done all the same
    bars = []

    class Bar:
        def __init__(self, total, progress):
            self.total, self.done = total, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            pass

    monkeypatch.setattr("featlab.cache.verify._bar", Bar)
    report = verify(partial_cache.path, block_bytes=1, progress=True)  # a block per row
    assert report.ok and report.bytes_read < bars[0].total
    assert bars[0].done == bars[0].total


def test_partial_marked_complete_is_a_problem(make_cache):
    exp = make_cache("val.h5" + schema.PARTIAL_SUFFIX, complete=True)
    report = verify(exp.path, progress=False)
    assert _checks(report) == ["completeness"]
    assert "rename it to val.h5" in report.problems[0].message


def test_missing_shard_is_a_problem(distributed_cache):
    (distributed_cache.path.parent / "val.h5.shards" / "rank-0-of-2.h5").unlink()
    report = verify(distributed_cache.path, progress=False)
    # the one problem: the rest would only find the fill values read where the shard was
    assert _checks(report) == ["files"] and "rank-0-of-2.h5" in report.text()
    assert "Fix: put the shards back in 'val.h5.shards' next to it" in report.problems[0].message


@pytest.mark.filterwarnings("default::featlab.errors.FeatlabWarning")
def test_cli_warns_of_a_damaged_cache_in_one_line(make_cache, capsys, cli_state):
    exp = make_cache()
    with h5py.File(exp.path, "r+") as f:
        f["written"][4] = 0
    assert cli.main(["inspect", str(exp.path)]) == 0
    err = capsys.readouterr().err.strip()
    assert err == (f"featlab inspect: warning: {exp.path} is marked complete but only 11 of 12 "
                   f"samples are flagged written; reading those. Fix: run `featlab verify "
                   f"{exp.path}`.")
    assert cli.main(["verify", str(exp.path), "-q"]) == 1
    assert "Fix: re-extract with --force" in capsys.readouterr().out


def test_not_a_cache_raises_for_exit_code_2(tmp_path):
    with pytest.raises(CacheError, match="no such file"):
        verify(tmp_path / "missing.h5", progress=False)
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f.attrs["schema"] = "something-else"
    with pytest.raises(CacheError, match="schema='something-else'"):
        verify(tmp_path / "x.h5", progress=False)


def test_float16_error_bounds_are_recomputed_from_the_stored_values(tmp_path):
    import featlab
    import featlab.testing as ft
    from featlab.models import BackboneSpec

    spec = BackboneSpec("tiny", "none", (0.5,) * 3, (0.25,) * 3, 32, 10)
    ds = featlab.load_dataset("shapes", "val", size=32, length=5)
    path = tmp_path / "c.h5"
    featlab.extract(ft.TinyResNet(), ds, "stages", path, spec=spec, batch_size=2,
                    num_workers=0, progress=False)
    assert verify(path, progress=False).ok
    with h5py.File(path, "r+") as f:
        assert f["stats/abs_error"].attrs["statistic"] == "bound"
        f["stats/abs_error"][3, 1] *= 2  # no longer what the stored values give
    report = verify(path, progress=False)
    assert _checks(report) == ["abs_error"]
    assert "layer1.1" in report.problems[0].message and "1 sample(s) differ" in \
        report.problems[0].message and "'val/s0/000003'" in report.problems[0].message
