"""`featlab probe` and `featlab saliency` end to end on tiny shapes data."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
import torch

import featlab
import featlab.testing as ft
from featlab.cli import main
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 32, 10)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for split, n in (("train", 10), ("val", 6)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(), ds, "all", root / f"{split}.h5", spec=SPEC,
                        batch_size=8, dtype="float16", num_workers=0, progress=False)
    return root


def test_probe_cli_writes_and_prints_the_table(caches, capsys):
    train, val = caches / "train.h5", caches / "val.h5"
    assert main(["probe", "--train", str(train), "--val", str(val), "--points", "stages",
                 "--alpha", "1e-3", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "layer1.0" in printed and "miou" in printed
    assert printed.rstrip().endswith(f"-> {caches / 'train.probe.json'}, "
                                     f"{caches / 'train.probe.csv'}")  # the files it wrote
    rows = list(csv.DictReader((caches / "train.probe.csv").open()))
    assert [r["point"] for r in rows] == ["layer1.0", "layer1.1"]
    assert 0 <= float(rows[0]["miou"]) <= 1
    saved = json.loads((caches / "train.probe.json").read_text())
    assert saved["settings"]["alpha"] == 1e-3 and saved["val"]["path"].endswith("val.h5")
    # no overwrite without --force: one line, exit 2
    assert main(["probe", "--train", str(train), "--val", str(val), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featlab probe: error:") and "--force" in err and "\n" not in err
    out = caches / "other"
    assert main(["probe", "--train", str(train), "--val", str(val), "--points", "layer1.1",
                 "--alpha", "1e-3", "--out", str(out), "--json", "--max-pixels", "0",
                 "-q"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["scores"][0]["point"] == "layer1.1"
    assert printed["settings"]["max_pixels"] is None  # every labelled pixel
    assert printed["scores"][0]["n_pixels"] == 10 * 32 * 32  # shapes labels have no 255


def test_probe_cli_random_backbone_baseline(caches, tmp_path, capsys):
    spec = dataclasses.replace(SPEC, seed=5)
    for split, n in (("train", 10), ("val", 6)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(seed=5), ds, "stages", tmp_path / f"r{split}.h5",
                        spec=spec, batch_size=8, dtype="float16", num_workers=0,
                        progress=False)
    args = ["probe", "--train", str(caches / "train.h5"), "--val", str(caches / "val.h5"),
            "--points", "stages", "--alpha", "1e-3", "--out", str(tmp_path / "p"), "-q"]
    assert main(args + ["--random-train", str(tmp_path / "rtrain.h5")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--random-val" in err and "\n" not in err
    assert main(args + ["--random-train", str(tmp_path / "rtrain.h5"), "--random-val",
                        str(tmp_path / "rval.h5")]) == 0
    assert "random_miou" in capsys.readouterr().out
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert all(0 <= float(r["random_miou"]) <= 1 for r in rows)


def test_probe_cli_errors_are_one_line(caches, capsys):
    assert main(["probe", "--train", str(caches / "train.h5"), "--val",
                 str(caches / "missing.h5"), "-q"]) == 2
    assert main(["probe", "--train", str(caches / "train.h5"), "--val",
                 str(caches / "val.h5"), "--points", "layer9", "--force", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(e.startswith("featlab probe: error:") for e in err)


def test_saliency_cli_writes_grid_and_summary(tmp_path, capsys):
    out = tmp_path / "sal"
    args = ["saliency", "--model", "resnet18", "--weights", "none", "--data", "shapes",
            "--input-size", "32", "--points", "layer1.1,layer3.1", "--limit", "4", "--show",
            "2", "--batch-size", "4", "--out", str(out), "-q"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "energy_in_mask" in printed and "layer3.1" in printed
    assert (out / "saliency_gradcam.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((out / "saliency.json").read_text())
    assert [p["point"] for p in summary["points"]] == ["layer1.1", "layer3.1"]
    assert [p["stride"] for p in summary["points"]] == [4, 16]
    assert summary["method"] == "gradcam" and summary["model"]["name"] == "resnet18"
    assert main(args) == 2  # exists: --force needed
    assert "--force" in capsys.readouterr().err
    args[args.index("--points") + 1] = "input,layer2.1"
    assert main(args + ["--method", "saliency", "--force"]) == 0
    assert (out / "saliency_saliency.png").exists()
    summary = json.loads((out / "saliency.json").read_text())
    assert [p["point"] for p in summary["points"]] == ["input", "layer2.1"]
    assert summary["points"][0]["stride"] == 1
    args[args.index("--points") + 1] = "layer1.1"
    assert main(args + ["--method", "layercam", "--force"]) == 0
    assert (out / "saliency_layercam.png").exists()
    summary = json.loads((out / "saliency.json").read_text())
    assert summary["method"] == "layercam" and summary["settings"]["relu"] is True
    capsys.readouterr()
    assert main(["saliency", "--model", "resnet18", "--weights", "none", "--points", "layerX",
                 "--size", "32", "--out", str(tmp_path / "x"), "-q"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize("device, message", [
    ("gpu", "`device` must be cpu, cuda or cuda:N; got 'gpu'."),
    ("cuda", ("`device` must be available; got 'cuda', but torch sees no CUDA device. Fix: use "
              "--device cpu, or leave it unset.")),
])
def test_every_command_names_a_device_it_cannot_use_in_one_line(caches, capsys, tmp_path,
                                                                 device, message):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    train, val = str(caches / "train.h5"), str(caches / "val.h5")
    out = str(tmp_path / "out")
    commands = {
        "probe": ["probe", "--train", train, "--val", val, "--out", out],
        "analyze cka": ["analyze", "cka", train, "--out", out],
        "analyze resolution": ["analyze", "resolution", train, "--out", out],  # even without ERF
        "saliency": ["saliency", "--model", "resnet18", "--weights", "none", "--size", "32",
                     "--limit", "2", "--out", out],
        "train-head": ["train-head", "--train", train, "--val", val, "--epochs", "1",
                       "--out", out],
        "pretrain": ["pretrain"],  # refused before it looks for a checkpoint
    }
    for name, argv in commands.items():
        assert main([*argv, "--device", device, "-q"]) == 2, name
        assert capsys.readouterr().err.strip() == f"featlab {name}: error: {message}"
    assert list(tmp_path.iterdir()) == []
