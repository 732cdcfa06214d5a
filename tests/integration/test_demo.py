"""`featlab demo` end to end at toy size: every step runs, prints its command, and is reused --
but only with the settings it was made with."""

from __future__ import annotations

import contextlib
import io
import json
import shutil

import pytest

from featlab.cli import main

TOY = ["--pretrain-steps", "2", "--size", "32", "--batch-size", "4", "--train-samples", "16",
       "--val-samples", "6", "--seeds", "2", "--epochs", "1", "--quiet"]


def _with(**changes: str) -> list[str]:
    """TOY with some options changed (``size="64"`` -> ``--size 64``)."""
    argv = list(TOY)
    for name, value in changes.items():
        argv[argv.index(f"--{name.replace('_', '-')}") + 1] = value
    return argv


def _files(folder) -> dict:
    """Every file under ``folder`` with its size and modification time (what a rerun changes)."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _table(text: str) -> str:
    """The sweep's table and everything printed after it."""
    return text[text.index("\npoint "):]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One toy demo run (the slow part, shared): ``(out, its stdout, the cache dir)``."""
    root = tmp_path_factory.mktemp("demo")
    out, stdout = root / "demo", io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATLAB_CACHE_DIR", str(root / "cache"))
        with contextlib.redirect_stdout(stdout):
            assert main(["demo", "--out", str(out), *TOY]) == 0
    return out, stdout.getvalue(), root / "cache"


@pytest.fixture
def cache_dir(demo, monkeypatch):
    """The pretrained backbone of the shared run (reused, not trained again)."""
    monkeypatch.setenv("FEATLAB_CACHE_DIR", str(demo[2]))


@pytest.mark.slow
def test_demo_runs_every_step_then_reuses_them(demo, cache_dir, capsys):
    out, first = demo[0], demo[1]
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in first
    assert first.count("$ featlab extract --model resnet18 --weights shapes:") == 2
    assert "$ featlab sweep --train" in first
    rows = json.loads((out / "sweep" / "sweep.json").read_text())
    assert rows  # the sweep's record, written by the sweep command
    predictors = json.loads((out / "sweep" / "predictors.json").read_text())
    assert {p["property"] for p in predictors["predictors"]} >= {"stride", "probe_miou"}

    before = _files(out)
    assert main(["demo", "--out", str(out), *TOY]) == 0  # the same settings: nothing recomputed
    second = capsys.readouterr().out
    assert "$ featlab extract" not in second and second.count("already extracted") == 2
    assert "already done" in second and "(reused)" in second
    assert _table(second) == _table(first)  # the table the sweep printed when it ran
    assert _files(out) == before  # nothing written


@pytest.mark.slow
def test_demo_refuses_caches_of_another_input_size(demo, cache_dir, capsys):
    out = demo[0]
    before = _files(out)
    assert main(["demo", "--out", str(out), *_with(size="64")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err  # one line, no traceback
    assert "input size (`--size`)" in lines[0] and "32 there, 64 now" in lines[0]
    assert "train.h5" in lines[0] and "another --out" in lines[0] and "--force" in lines[0]
    assert "$ featlab" not in captured.out  # refused before any step ran
    assert _files(out) == before  # nothing lost or overwritten


@pytest.mark.slow
def test_demo_refuses_a_sweep_of_other_epochs_unless_forced(demo, cache_dir, capsys, tmp_path):
    out = tmp_path / "demo"
    shutil.copytree(demo[0], out)  # the shared run stays as it is
    before = _files(out)
    assert main(["demo", "--out", str(out), *_with(epochs="2")]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "`--epochs`" in lines[0] and "1 there, 2 now" in lines[0]
    assert _files(out) == before

    assert main(["demo", "--out", str(out), "--force", *_with(epochs="2")]) == 0
    text = capsys.readouterr().out
    assert text.count("already extracted") == 2 and "$ featlab extract" not in text
    assert f"--epochs 2 --fusion concat --out {out / 'sweep'} --force" in text  # only it reruns
    record = json.loads((out / "sweep" / "sweep.json").read_text())
    assert record["settings"]["epochs"] == 2
