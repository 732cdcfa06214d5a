"""featlab.extract on existing files: refusal, resume, write failures, the disk check."""

from __future__ import annotations

import errno
import json
import logging
import os
import re

import h5py
import numpy as np
import pytest
import torch

import featlab
import featlab.testing as ft
from featlab import cli
from featlab.cache import files, schema
from featlab.cache.direct import DirectWriter
from featlab.cache.plan import format_bytes
from featlab.cache.summary import format_summary, summary
from featlab.cache.writer import estimate, extract
from featlab.data import load_dataset
from featlab.errors import CacheError
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)
ARGS = dict(spec=SPEC, batch_size=3, num_workers=0, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def dataset(n=10):
    return load_dataset("shapes", "val", size=32, length=n)


def contents(path):
    with h5py.File(path, "r") as f:
        out = {}
        f.visititems(lambda name, obj: out.__setitem__(name, obj[...])
                     if isinstance(obj, h5py.Dataset) else None)
        return out


def fail_writes_after(monkeypatch, calls):
    """Make point-row writes raise ENOSPC after `calls` of them (h5py or direct I/O)."""
    count = {"n": 0}

    def tick():
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(errno.ENOSPC, "No space left on device")

    original = h5py.Dataset.__setitem__

    def setitem(self, key, value):
        if self.name.startswith("/points/"):
            tick()
        return original(self, key, value)

    direct = DirectWriter.write

    def write(self, dset, first, array):
        done = direct(self, dset, first, array)
        if done:  # rows that went direct count here; the others reach setitem
            tick()
        return done

    monkeypatch.setattr(h5py.Dataset, "__setitem__", setitem)
    monkeypatch.setattr(DirectWriter, "write", write)


def test_disk_full_mid_run_leaves_a_cache_that_resumes_to_the_same_values(tmp_path, monkeypatch):
    model, ds = ft.TinyResNet(), dataset()
    reference = extract(model, ds, "stages", tmp_path / "ref.h5", **ARGS)
    out = tmp_path / "c.h5"
    fail_writes_after(monkeypatch, calls=2 * 2)  # two batches of the two points go through
    with pytest.raises(CacheError, match="No space left on device.*resumable"):
        extract(model, ds, "stages", out, **ARGS)
    monkeypatch.undo()
    assert not out.exists()
    with h5py.File(str(out) + schema.PARTIAL_SUFFIX, "r", locking=False) as f:
        assert f[schema.WRITTEN][:].tolist() == [1] * 6 + [0] * 4
        assert not f.attrs["complete"]
    resumed = extract(model, ds, "stages", out, **ARGS)
    assert (resumed.written, resumed.skipped) == (4, 6)
    assert resumed.num_samples == reference.num_samples == 10
    got, expected = contents(out), contents(tmp_path / "ref.h5")
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # the cache says that its rows came from two sessions, and what finished it
    (record,) = featlab.open_cache(out).finished
    assert (record["rank"], record["rows"], record["of"], record["device"]) == (0, 4, 10, "cpu")
    assert record["versions"]["featlab"] == featlab.__version__
    assert featlab.open_cache(tmp_path / "ref.h5").finished[0]["rows"] == 10
    (resume,) = featlab.open_cache(out).resumed  # the session that took up the partial file
    assert (resume["rank"], resume["skipped"], resume["of"], resume["device"]) == (0, 6, 10, "cpu")
    shown = format_summary(summary(out))
    assert "resumed   rank 0: the session that finished it computed 4 of 10 rows (cpu" in shown
    assert "resumed   rank 0: a session resumed it at 6 of 10 rows (cpu" in shown
    assert "resumed" not in format_summary(summary(tmp_path / "ref.h5"))
    assert featlab.open_cache(tmp_path / "ref.h5").resumed is None


def test_every_session_that_computed_rows_is_on_record_also_one_that_failed(tmp_path,
                                                                             monkeypatch):
    """Three sessions write one cache: the first fails after 6 rows, the second resumes and fails
    after 3 more, the third resumes and finishes. ``created``/``versions`` record the first,
    ``resumed`` the other two in order (rows already there when each began), ``finished`` the
    last; the values equal an uninterrupted run's."""
    model, ds = ft.TinyResNet(), dataset()
    out = tmp_path / "c.h5"
    for calls in (2 * 2, 1 * 2):  # two batches of the two points; then one more batch
        fail_writes_after(monkeypatch, calls=calls)
        with pytest.raises(CacheError, match="No space left on device"):
            extract(model, ds, "stages", out, **ARGS)
        monkeypatch.undo()
    partial = str(out) + schema.PARTIAL_SUFFIX
    with h5py.File(partial, "r", locking=False) as f:
        assert f[schema.WRITTEN][:].tolist() == [1] * 9 + [0]
        # the second session is on record although it never finished
        (second,) = json.loads(f.attrs["resumed"])
        assert (second["rank"], second["skipped"], second["of"]) == (0, 6, 10)
    assert extract(model, ds, "stages", out, **ARGS).written == 1
    cache = featlab.open_cache(out)
    assert [(r["skipped"], r["of"], r["device"]) for r in cache.resumed] == [(6, 10, "cpu"),
                                                                             (9, 10, "cpu")]
    assert all(r["versions"]["featlab"] == featlab.__version__ for r in cache.resumed)
    assert [(r["rows"], r["of"]) for r in cache.finished] == [(1, 10)]
    shown = format_summary(summary(out))
    assert shown.count("resumed   rank 0: a session resumed it at ") == 2
    assert "resumed it at 9 of 10 rows (cpu, featlab" in shown
    assert "resumed it at 9 of 10 rows (cpu, featlab" in cache._repr_html_()  # in Jupyter too
    cache.close()
    reference = extract(model, ds, "stages", tmp_path / "ref.h5", **ARGS)
    got, expected = contents(out), contents(reference.path)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_direct_io_writes_the_same_file_and_a_failed_direct_write_resumes(tmp_path,
                                                                           monkeypatch):
    """O_DIRECT rows (layer1.0: 8x16x16 float16 = 4096 bytes) and h5py rows (layer1.1: 2048
    bytes) give the values a buffered run gives; ENOSPC inside a direct write leaves a cache
    that resumes to them."""
    import featlab.cache.direct as direct

    model, ds = ft.TinyResNet(), dataset()
    monkeypatch.setenv("FEATLAB_DIRECT_IO", "0")
    reference = contents(extract(model, ds, "stages", tmp_path / "ref.h5", **ARGS).path)
    monkeypatch.delenv("FEATLAB_DIRECT_IO")
    calls = {"n": 0}
    pwrite = os.pwrite

    def counted(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return pwrite(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", counted)
    out = tmp_path / "c.h5"
    with pytest.raises(CacheError, match="No space left on device.*resumable"):
        extract(model, ds, "stages", out, **ARGS)
    resumed = extract(model, ds, "stages", out, **ARGS)
    assert resumed.skipped == 6 and calls["n"] > 3  # two batches, then direct writes again
    got = contents(out)
    for name in reference:
        np.testing.assert_array_equal(got[name], reference[name], err_msg=name)


def test_resuming_with_other_settings_names_the_setting(tmp_path, monkeypatch):
    model, ds = ft.TinyResNet(), dataset()
    out = tmp_path / "c.h5"
    fail_writes_after(monkeypatch, calls=2)
    with pytest.raises(CacheError):
        extract(model, ds, "stages", out, **ARGS)
    monkeypatch.undo()
    partial = str(out) + schema.PARTIAL_SUFFIX
    cases = [
        (dict(dtype="float32"), f"`--dtype` differs from the partial cache at {partial}: "
                                "float16 there, float32 now. Fix: re-run with the same settings, "
                                "or --force"),
        (dict(max_size=2), "`--max-size` differs .*: 0 there, 2 now"),
        (dict(limit=5), "`--limit` differs .*: None there, 5 now"),
        (dict(save_images=True), "`--save-images` differs"),
        (dict(error_stat="exact"), "`--error-stat` differs .*: bound there, exact now"),
        (dict(max_channels=4), "`--max-channels` differs .*: 0 there, 4 now"),
        (dict(points="layer1.1"), "`--points` differs .*: layer1.0,layer1.1 there, layer1.1 now"),
    ]
    for change, message in cases:
        with pytest.raises(CacheError, match=message):
            extract(model, ds, change.pop("points", "stages"), out, **{**ARGS, **change})
    with pytest.raises(CacheError, match="the data set option `length` differs .*10 there, 11"):
        extract(model, dataset(11), "stages", out, **ARGS)
    with pytest.raises(CacheError, match="`--input-size` differs"):
        extract(model, load_dataset("shapes", "val", size=16, length=10), "stages", out, **ARGS)
    with pytest.raises(CacheError, match="`--data-seed` differs .*: 0 there, 1 now"):
        extract(model, load_dataset("shapes", "val", size=32, length=10, seed=1), "stages", out,
                **ARGS)
    other = ft.TinyResNet(seed=1)
    with pytest.raises(CacheError, match=r"the model's weights \(sha256 of its state_dict\)"):
        extract(other, ds, "stages", out, **ARGS)
    # batch size and workers are not part of the identity: this resumes
    result = extract(model, ds, "stages", out, **{**ARGS, "batch_size": 4})
    assert (result.written, result.skipped) == (7, 3)


def refusal(out, part=""):
    """The start of the error for a cache that this process is writing (its lock held)."""
    return (f"{out} must be written by one extraction at a time; another process is writing "
            f"it{part} (pid {os.getpid()} on ")


def test_one_extraction_at_a_time_writes_a_cache_force_included(tmp_path):
    model, ds = ft.TinyResNet(), dataset()
    out = tmp_path / "c.h5"
    held = files.OutLock(str(out))  # another extraction, in the middle of writing `out`
    try:
        for force in (False, True):
            with pytest.raises(CacheError, match="^" + re.escape(refusal(out)) +
                               r".+\)\. Fix: wait for it to finish"):
                extract(model, ds, "stages", out, force=force, **ARGS)
        assert os.listdir(tmp_path) == ["c.h5.lock"]  # nothing made, nothing deleted
        note = estimate(model, ds, "stages", out, spec=SPEC).existing
        assert note.startswith(f"the run would be refused: {refusal(out)}")
    finally:
        held.release()
    assert os.listdir(tmp_path) == []
    (tmp_path / "c.h5.lock").write_text("pid 1 on elsewhere\n")  # left by a run killed with -9
    assert files.writer_of(str(out)) is None
    assert extract(model, ds, "stages", out, **ARGS).written == 10
    assert os.listdir(tmp_path) == ["c.h5"]


def test_a_torchrun_rank_that_outlived_its_run_keeps_its_shard_locked(tmp_path):
    # torchrun starts its workers in sessions of their own: killing the launcher and rank 0 can
    # leave rank 1 writing its shard, which the next run's rank 1 must not share
    out = str(tmp_path / "c.h5")
    stray = files.OutLock(out, rank=1)
    try:
        stray_rank = " (its rank 1's shard)"
        with pytest.raises(CacheError, match="^" + re.escape(refusal(out, stray_rank)) +
                           r".+\)\. Fix: wait"):
            files.OutLock(out, rank=1)
        files.OutLock(out, rank=0, world_size=2).release()  # rank 1 is its own run's
        with pytest.raises(CacheError, match=r"\(its rank 1's shard\)"):
            files.OutLock(out, rank=0)  # a one-process run: rank 1 is a stray
        note = estimate(ft.TinyResNet(), dataset(), "stages", out, spec=SPEC).existing
        assert note.startswith(f"the run would be refused: {refusal(out, stray_rank)}")
    finally:
        stray.release()
    assert os.listdir(tmp_path) == []


def test_dry_run_says_what_the_run_would_do_with_the_files_there(tmp_path, monkeypatch):
    model, ds = ft.TinyResNet(), dataset()
    out = tmp_path / "c.h5"
    partial = str(out) + schema.PARTIAL_SUFFIX

    def existing(**kwargs):
        return estimate(model, ds, "stages", out, spec=SPEC, num_workers=0, **kwargs).existing

    assert existing() is None and existing(force=True) is None
    fail_writes_after(monkeypatch, calls=2 * 2)  # two batches of the two points go through
    with pytest.raises(CacheError):
        extract(model, ds, "stages", out, **ARGS)
    monkeypatch.undo()
    assert existing() == (f"the run would resume {partial}: 6 of 10 samples written, the rest "
                          "computed")
    refused = existing(max_size=2)
    assert refused == ("the run would be refused: `--max-size` differs from the partial cache at "
                       f"{partial}: 0 there, 2 now. Fix: re-run with the same settings, or --force "
                       "(force=True) to start over.")
    with pytest.raises(CacheError) as err:  # what the run says
        extract(model, ds, "stages", out, **{**ARGS, "max_size": 2})
    assert refused.endswith(str(err.value))
    assert existing(force=True) == f"--force: the run would delete {partial} and start over"
    assert os.path.exists(partial) and not out.exists()  # a dry run changes nothing
    result = extract(model, ds, "stages", out, **ARGS)
    assert (result.written, result.skipped) == (4, 6)
    assert existing().startswith("the run would be refused: `out` must not be a complete cache")
    folder = estimate(model, ds, "stages", tmp_path, spec=SPEC).existing
    assert folder == ("the run would be refused: `out` must be a file path; got the folder "
                      f"{tmp_path}. Fix: name the cache file, e.g. --out caches/r50-voc-val.h5.")


def test_a_partial_cache_without_a_sample_is_replaced_by_other_settings(tmp_path, monkeypatch):
    # a run that fails before its first batch is written (a bad sample, a full disk) leaves
    # nothing worth keeping: the fixed command must not need --force
    model, ds = ft.TinyResNet(), dataset()
    out = tmp_path / "c.h5"
    fail_writes_after(monkeypatch, calls=0)
    with pytest.raises(CacheError):
        extract(model, ds, "stages", out, **ARGS)
    monkeypatch.undo()
    partial = str(out) + schema.PARTIAL_SUFFIX
    with h5py.File(partial, "r") as f:
        assert not f[schema.WRITTEN][:].any()
    result = extract(model, ds, "stages", out, **{**ARGS, "dtype": "float32"})
    assert (result.written, result.skipped) == (10, 0) and not os.path.exists(partial)
    with h5py.File(out, "r") as f:
        assert f["points/layer1.1"].dtype == np.float32


def test_a_complete_cache_is_never_overwritten_without_force(tmp_path, capsys):
    model, ds = ft.TinyResNet(), dataset(4)
    out = tmp_path / "c.h5"
    extract(model, ds, "stages", out, **ARGS)
    before = out.stat().st_mtime_ns
    with pytest.raises(CacheError, match="never overwrites a cache.*--force"):
        extract(model, ds, "stages", out, **ARGS)
    assert out.stat().st_mtime_ns == before
    result = extract(model, ds, "all", out, force=True, **ARGS)  # other settings, rebuilt
    assert result.written == 4 and len(result.points) > 2


def test_an_existing_file_that_is_no_complete_cache_is_named_for_what_it_is(tmp_path):
    model, ds = ft.TinyResNet(), dataset(4)
    out = tmp_path / "c.h5"
    out.write_bytes(b"my notes")  # not a cache at all
    with pytest.raises(CacheError, match=r"must not be an existing file unless --force .*"
                                         r"c\.h5 is not a featlab cache\."):
        extract(model, ds, "stages", out, **ARGS)
    assert out.read_bytes() == b"my notes"
    extract(model, ds, "stages", out, force=True, **ARGS)
    with h5py.File(out, "r+") as f:  # a hand-edited cache: featlab never leaves this behind
        f.attrs["complete"] = False
    with pytest.raises(CacheError, match="is a featlab cache marked incomplete, which featlab "
                                         "never leaves under a final name"):
        extract(model, ds, "stages", out, **ARGS)


def test_cli_refuses_an_existing_cache_with_exit_code_2_and_one_line(tmp_path, capsys,
                                                                      cli_state):
    out = tmp_path / "c.h5"
    argv = ["extract", "--model", "resnet18", "--weights", "none",
            "--data", "shapes", "--input-size", "32",
            "--limit", "2", "--batch-size", "2", "--out", str(out), "--quiet", "--num-workers",
            "0"]  # --workers, as Python's num_workers
    assert cli.main(argv) == 0 and out.exists()
    # quiet: no bars, no log, but the result on stdout
    assert capsys.readouterr().out == f"{out}: 5 points x 2 samples, " + (
        f"{format_bytes(out.stat().st_size)} (2 written now, 0 already there)\n")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("featlab extract: error:") and "--force" in err


def test_cli_log_lines_name_their_command_as_errors_and_warnings_do(tmp_path, capsys,
                                                                     cli_state, monkeypatch):
    monkeypatch.setenv("FEATLAB_PROGRESS", "0")  # no bar: every stderr line is a log line
    out = tmp_path / "c.h5"
    assert cli.main(["extract", "--model", "resnet18", "--weights", "none", "--data", "shapes",
                     "--input-size", "32", "--limit", "2", "--out", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.startswith("featlab extract: ") for line in lines)
    assert any(str(out) in line for line in lines)  # says what it wrote where
    with h5py.File(out, "r") as f:  # and the cache says how to make it again
        made = json.loads(f.attrs["versions"])
    assert made["command"] == ("featlab extract --model resnet18 --weights none --data shapes "
                               f"--input-size 32 --limit 2 --out {out}")
    from featlab.runinfo import run_versions, source_commit

    assert made["git"] == source_commit() and run_versions()["command"] is None  # reset after
    summary = str(featlab.open_cache(out)).splitlines()  # on a line of its own, to copy
    assert f"  command   {made['command']}" in summary
    assert not any(" None" in line for line in summary)  # nothing printed as "None"
    logging.getLogger("featlab").warning("resuming %s", out)  # as the resume's notices are
    assert capsys.readouterr().err == f"featlab extract: warning: resuming {out}\n"


def test_cli_extract_needs_weights_said_out_loud(tmp_path, capsys, cli_state):
    # a cache of a random-init backbone is rarely what one wants: `--weights none` says so
    with pytest.raises(SystemExit) as exited:
        cli.main(["extract", "--model", "resnet18", "--data", "shapes", "--out",
                  str(tmp_path / "c.h5")])
    assert exited.value.code == 2
    assert "the following arguments are required: --weights" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, message", [
    ("gpu", "`device` must be cpu, cuda or cuda:N; got 'gpu'."),
    ("cuda", ("`device` must be available; got 'cuda', but torch sees no CUDA device. Fix: use "
              "--device cpu, or leave it unset.")),
])
def test_cli_names_a_device_it_cannot_use_in_one_line(tmp_path, capsys, cli_state, device,
                                                       message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "c.h5"
    argv = ["extract", "--model", "resnet18", "--weights", "none",
            "--data", "shapes", "--input-size", "32",
            "--limit", "2", "--out", str(out), "--quiet", "--device", device]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.strip() == f"featlab extract: error: {message}"
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")


def test_unwritable_folder_fails_before_any_compute(tmp_path):
    model = ft.TinyCNN()
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache's folder should be")
    with pytest.raises(CacheError, match="must be in a folder featlab can write"):
        extract(model, dataset(4), "stages", blocker / "c.h5", **ARGS)
    assert calls == []
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(CacheError, match="must be in a folder featlab can write"):
            extract(model, dataset(4), "stages", locked / "c.h5", **ARGS)
        assert calls == []


def test_disk_check_refuses_what_does_not_fit(tmp_path, monkeypatch):
    import featlab.cache.writer as writer

    monkeypatch.setattr(writer, "free_disk_bytes", lambda path: 1000)
    with pytest.raises(CacheError, match="needs .* more and has 1000 B free.*--no-disk-check"
                       ) as err:
        extract(ft.TinyCNN(), dataset(4), "stages", tmp_path / "c.h5", **ARGS)
    assert "--dtype" not in str(err.value)  # float16 already: the fix offers what is left
    with pytest.raises(CacheError, match="shrink it with --dtype float16, --max-size"):
        extract(ft.TinyCNN(), dataset(4), "stages", tmp_path / "c.h5", dtype="float32", **ARGS)
    assert not list(tmp_path.iterdir())
    result = extract(ft.TinyCNN(), dataset(4), "stages", tmp_path / "c.h5", disk_check=False,
                     **ARGS)
    assert result.written == 4


def partial_from_complete(tmp_path, model, ds, flags):
    """A complete extraction made into ``c.h5.partial`` whose ``written`` flags are ``flags``."""
    ref = tmp_path / "ref.h5"
    extract(model, ds, "stages", ref, **ARGS)
    partial = str(tmp_path / "c.h5") + schema.PARTIAL_SUFFIX
    os.rename(ref, partial)
    with h5py.File(partial, "r+", locking=False) as f:
        f.attrs.modify("complete", False)
        f[schema.WRITTEN][...] = np.array(flags, np.uint8)
    return partial


def assert_equals_a_fresh_run(tmp_path, model, ds):
    extract(model, ds, "stages", tmp_path / "ref.h5", **ARGS)
    got, expected = contents(tmp_path / "c.h5"), contents(tmp_path / "ref.h5")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    return got


def test_a_batch_recomputed_after_a_kill_is_the_same_batch(tmp_path):
    # a partial file whose flags say rows 0-2 and 6 were written (as if batch 2 of a run with
    # batch size 3 was cut short and the run then continued with batch size... 1 elsewhere)
    model, ds = ft.TinyResNet(), dataset(8)
    partial = partial_from_complete(tmp_path, model, ds, [1, 1, 1, 0, 0, 0, 1, 0])
    with h5py.File(partial, "r+", locking=False) as f:
        sentinel = f["points/layer1.1"][6].copy()
        for name in ("points/layer1.1", "points/layer1.0"):
            f[name][3:6] = np.full(f[name].shape[1:], 7.0, np.float16)  # stale junk rows
    result = extract(model, ds, "stages", tmp_path / "c.h5", **ARGS)
    assert (result.written, result.skipped) == (4, 4)
    got = assert_equals_a_fresh_run(tmp_path, model, ds)
    np.testing.assert_array_equal(got["points/layer1.1"][6], sentinel)
    assert torch.is_inference_mode_enabled() is False


def test_resume_extracts_again_the_last_rows_that_do_not_read_back_as_recorded(tmp_path,
                                                                                caplog):
    # flags say rows 0-5 were written, but a crash lost what rows 4 and 5 held on disk
    # (4 zeroed, 5 partly NaN); rows 0-3 are fine. Resuming checks the last chunk's worth.
    model, ds = ft.TinyResNet(), dataset(10)
    partial = partial_from_complete(tmp_path, model, ds, [1] * 6 + [0] * 4)
    with h5py.File(partial, "r+", locking=False) as f:
        assert f["points/layer1.1"].chunks[0] >= 3  # rows 3-5 lie in the last chunk checked
        f["points/layer1.1"][4] = np.zeros(f["points/layer1.1"].shape[1:], np.float16)
        f["points/layer1.0"][5, 0] = np.nan
    plan = estimate(model, ds, "stages", tmp_path / "c.h5", spec=SPEC, num_workers=0)
    assert plan.existing == (f"the run would resume {partial}: 6 of 10 samples written (2 near "
                             "the end do not read back as recorded and are computed again), "
                             "the rest computed")  # what the run then does
    with caplog.at_level("WARNING", logger="featlab"):
        result = extract(model, ds, "stages", tmp_path / "c.h5", **ARGS)
    assert (result.written, result.skipped) == (6, 4)
    assert "2 written sample(s) near the end (rows 4, 5) do not read back" in caplog.text
    assert_equals_a_fresh_run(tmp_path, model, ds)


def test_resume_trusts_rows_that_read_back_as_recorded(tmp_path):
    model, ds = ft.TinyResNet(), dataset(10)
    partial_from_complete(tmp_path, model, ds, [1] * 9 + [0])
    result = extract(model, ds, "stages", tmp_path / "c.h5", **ARGS)
    assert (result.written, result.skipped) == (1, 9)


def test_a_partial_cache_that_cannot_be_written_is_refused_with_the_fix(tmp_path, monkeypatch):
    model, ds = ft.TinyResNet(), dataset()
    out = tmp_path / "c.h5"
    fail_writes_after(monkeypatch, calls=2 * 2)
    with pytest.raises(CacheError):
        extract(model, ds, "stages", out, **ARGS)
    monkeypatch.undo()
    partial = str(out) + schema.PARTIAL_SUFFIX
    opened = h5py.File  # the file system's refusal, simulated (root ignores chmod)

    def read_only(name, mode="r", *args, **kwargs):
        if str(name) == partial and mode == "r+":
            raise OSError(errno.EACCES, "Permission denied")
        return opened(name, mode, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", read_only)
    with pytest.raises(CacheError, match=r"must be writable to resume.*Fix: make the file "
                                         r"writable \(chmod u\+w\), or --force"):
        extract(model, ds, "stages", out, **ARGS)
    monkeypatch.undo()
    with h5py.File(partial, "r", locking=False) as f:  # left as it was: it still resumes
        assert f[schema.WRITTEN][:].tolist() == [1] * 6 + [0] * 4 and not f.attrs["resumed"]
    assert extract(model, ds, "stages", out, **ARGS).written == 4


def test_a_partial_cache_of_another_world_size_says_how_to_resume_it(tmp_path):
    out = tmp_path / "c.h5"
    shards = tmp_path / "c.h5.shards"
    shards.mkdir()
    (shards / "rank-0-of-2.h5.partial").write_bytes(b"")  # what `torchrun` left (the name counts)
    message = (f"the number of processes (torchrun world size) differs from the partial cache "
               f"at {shards}: 2 there, 1 now. Fix: re-run under torchrun --nproc_per_node=2 (or "
               "nodes x processes = 2) to resume it, or --force (force=True) to start over.")
    with pytest.raises(CacheError) as err:
        extract(ft.TinyResNet(), dataset(), "stages", out, **ARGS)
    assert str(err.value) == message
    assert (estimate(ft.TinyResNet(), dataset(), "stages", out, spec=SPEC).existing
            == f"the run would be refused: {message}")


def test_fewer_samples_than_processes_are_refused_before_any_file(tmp_path, monkeypatch):
    from featlab import distributed as fdist

    monkeypatch.setattr(fdist, "init", lambda device: fdist.DistInfo(0, 3, 0, 3))
    with pytest.raises(featlab.errors.ConfigError, match=(
            r"^every one of the 3 processes must get a sample; got 2 samples\. Fix: run at most "
            r"2 processes \(torchrun --nproc_per_node\), or extract more samples \(--limit\)\.$")):
        extract(ft.TinyResNet(), dataset(), "stages", tmp_path / "c.h5", limit=2, **ARGS)
    assert os.listdir(tmp_path) == []


def test_the_lock_holds_up_where_things_go_wrong(tmp_path, monkeypatch, caplog):
    out = str(tmp_path / "c.h5")
    model, ds = ft.TinyResNet(), dataset()
    # a rank of an earlier run with more processes, still writing: rank 0 refuses too
    stray = files.OutLock(out, rank=3)
    try:
        with pytest.raises(CacheError, match=r"\(its rank 3's shard\) \(pid \d+ on .+\)\. Fix"):
            extract(model, ds, "stages", out, force=True, **ARGS)
    finally:
        stray.release()
    assert os.listdir(tmp_path) == []
    # anything failing once the lock is taken lets go of it
    def boom():
        raise KeyboardInterrupt

    monkeypatch.setattr(files.socket, "gethostname", boom)
    with pytest.raises(KeyboardInterrupt):
        files.OutLock(out)
    monkeypatch.undo()
    files.OutLock(out).release()
    # a forked child (a DataLoader worker) does not keep the lock
    held = files.OutLock(out)
    pid = os.fork()
    if pid == 0:  # the child: its copy of the descriptor is closed
        try:
            os.fstat(held._fd)
            os._exit(1)
        except OSError:
            os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
    held.release()
    # a stale lock file another user left (not writable here) is taken over once free
    real_open = os.open

    def open_as_other_user(path, flags, *args):
        if str(path).endswith(".lock") and flags & os.O_CREAT and os.path.exists(path):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args)

    (tmp_path / "c.h5.lock").write_text("pid 1 on elsewhere\n")
    monkeypatch.setattr(files.os, "open", open_as_other_user)
    files.OutLock(out).release()
    monkeypatch.undo()
    # a file system without flock: the run goes on, with a warning
    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(files.fcntl, "flock", no_flock)
    with caplog.at_level(logging.WARNING, logger="featlab"):
        assert extract(model, ds, "stages", out, **ARGS).written == 10
    assert "a second extraction into" in caplog.text and "would not be refused" in caplog.text
    assert os.listdir(tmp_path) == ["c.h5"]


def test_a_limit_above_the_data_set_says_all_samples_are_extracted(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="featlab"):
        result = extract(ft.TinyResNet(), dataset(), "stages", tmp_path / "c.h5", limit=50,
                         **ARGS)
    assert result.num_samples == 10
    assert "--limit 50 is more than the 10 samples of shapes val: all 10 are extracted" in (
        caplog.text)
