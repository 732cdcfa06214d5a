"""`featlab demo` end to end at toy size: every step runs, prints its command, and is reused."""

from __future__ import annotations

import json

import pytest

from featlab.cli import main

TOY = ["--pretrain-steps", "2", "--size", "32", "--batch-size", "4", "--train-samples", "12",
       "--val-samples", "6", "--seeds", "2", "--epochs", "1", "--quiet"]


@pytest.mark.slow
def test_demo_runs_every_step_then_reuses_them(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEATLAB_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), *TOY]) == 0
    first = capsys.readouterr().out
    for step in ("[1/5]", "[2/5]", "[3/5]", "[4/5]", "[5/5]"):
        assert step in first
    assert first.count("$ featlab extract --model resnet18 --weights shapes:") == 2
    assert "$ featlab sweep --train" in first
    rows = json.loads((out / "sweep" / "sweep.json").read_text())
    assert rows  # the sweep's record, written by the sweep command
    predictors = json.loads((out / "sweep" / "predictors.json").read_text())
    assert {p["property"] for p in predictors["predictors"]} >= {"stride", "probe_miou"}

    assert main(["demo", "--out", str(out), *TOY]) == 0  # nothing is recomputed
    second = capsys.readouterr().out
    assert "$ featlab extract" not in second and "already extracted" in second
    assert "already done" in second and "(reused)" in second
