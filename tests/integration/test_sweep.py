"""`featlab sweep` end to end on tiny caches: table, files, predictors, refusal, resume."""

from __future__ import annotations

import json

import pytest

import featlab
import featlab.testing as ft
from featlab.cli import main
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweepcli")
    for split, n in (("train", 32), ("val", 16)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(), ds, "all", tmp / f"{split}.h5", spec=SPEC,
                        batch_size=16, dtype="float16", num_workers=0, progress=False)
    return tmp / "train.h5", tmp / "val.h5"


def test_sweep_cli_table_files_predictors_and_refusal(caches, capsys):
    cmd = ["sweep", "--train", str(caches[0]), "--val", str(caches[1]), "--points",
           "relu,layer1.0", "--seeds", "2", "--epochs", "1", "--batch-size", "8", "--lr", "0.01",
           "--bootstrap", "100", "-q", "--no-preload"]  # reads per batch: the same runs
    assert main(cmd) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "CI, all 2 at once" in out and "Spearman" in out
    folder = caches[0].parent / "sweep"
    record = json.loads((folder / "sweep.json").read_text())
    assert record["points"] == ["relu", "layer1.0"] and record["seeds"] == [0, 1]
    assert len(list((folder / "runs").iterdir())) == 6  # (baseline + 2 points) x 2 seeds
    preds = json.loads((folder / "predictors.json").read_text())
    assert {"stride", "rf_size", "probe_miou", "cka_to_last", "resolution_ceiling"} <= set(
        preds["properties"])
    assert {p["property"] for p in preds["predictors"]} == set(preds["properties"])
    assert preds["versions"]["featlab"] and set(preds["provenance"]["measured"]) == set(
        preds["properties"])
    # the same sweep again: nothing trained, the same table printed from the records
    stamps = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert main(cmd) == 0
    assert capsys.readouterr().out == out
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps
    # another setting: refused in one line naming it, nothing replaced
    assert main([*cmd[:-1], "--epochs", "2", "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featlab sweep: error: `--epochs` differs from the finished sweep in")
    assert "1 there, 2 now" in err and "--force" in err and "\n" not in err
    assert main([*cmd[:-1], "--seed-list", "0", "5", "-q"]) == 2
    assert "the seed list (`--seeds`, `--seed-list`)" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == stamps
    # one more seed extends the finished sweep: its 6 runs reused, 3 trained
    assert main([*cmd[:-1], "--seeds", "3", "--no-properties", "-q"]) == 0
    capsys.readouterr()
    assert json.loads((folder / "sweep.json").read_text())["seeds"] == [0, 1, 2]
    runs = {p: p.stat().st_mtime_ns for p in (folder / "runs").rglob("*") if p.is_file()}
    assert len({p.parent for p in runs}) == 9
    assert all(runs[p] == t for p, t in stamps.items() if p in runs)
    assert not (folder / "predictors.json").exists()  # it measured the 2-seed sweep
    # --force trains again; --json prints the rows
    assert main([*cmd, "--force", "--json", "--no-properties"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["point"] for r in data["rows"]] == ["baseline", "relu", "layer1.0"]
    assert data["sweep"]["skips"] == record["skips"]  # deterministic: same numbers again
