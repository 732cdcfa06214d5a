"""End to end: `featlab extract` on a miniature VOC tree, and featlab.extract on `shapes`."""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
import pytest
import torch

import featlab
from featlab import cli
from featlab.data import load_dataset
from featlab.data.fakes import write_voc


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_cli_extracts_a_miniature_voc_tree(tmp_path, capsys, cli_state):
    ids = [f"2007_{k:06d}" for k in (9, 3, 5, 1, 7)]
    masks = write_voc(tmp_path / "voc", {"train": ids[:2], "val": ids[2:]}, size=(30, 44))
    out = tmp_path / "caches" / "r18-voc-val.h5"
    argv = ["extract", "--model", "resnet18", "--weights", "none", "--data", "voc", "--root",
            str(tmp_path / "voc"), "--split", "val", "--points", "stages", "--input-size", "32",
            "--batch-size", "2", "--dtype", "float16", "--error-stat", "exact", "--save-images",
            "--out", str(out), "--quiet", "--json", "--workers", "0"]
    assert cli.main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["num_samples"] == 3 and result["written"] == 3
    ds = load_dataset("voc", "val", root=str(tmp_path / "voc"), size=32)
    with h5py.File(out, "r") as f:
        assert [i.decode() for i in f["ids"][:]] == sorted(ids[2:]) == ds.ids
        assert json.loads(f.attrs["classes"])[1] == "aeroplane"
        assert json.loads(f.attrs["data"])["root"] == os.path.abspath(tmp_path / "voc")
        labels = f["labels"][:]
        np.testing.assert_array_equal(labels, np.stack([ds[i]["mask"].numpy() for i in range(3)]))
        assert 255 in labels and set(np.unique(labels)) <= set(range(21)) | {255}
        assert f["images"].shape == (3, 3, 32, 32)
        assert sorted(f["points"]) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1", "relu"]
        assert f["stats/abs_error"].attrs["statistic"] == "exact"
    assert cli.main(["inspect", str(out)]) == 0
    assert "dtype float16 (rounding error: exact)" in capsys.readouterr().out
    assert {k: v.shape for k, v in masks.items()}[ids[2]] == (30, 44)  # resized to 32 on read


def test_python_api_on_shapes_matches_a_forward_of_the_same_samples(tmp_path):
    model, spec = featlab.get_backbone("resnet18", seed=3)
    ds = featlab.load_dataset("shapes", "val", size=32, length=6)
    # the public API; the normalization comes from the spec get_backbone attached to the model
    result = featlab.extract(model, ds, "layer2.1", tmp_path / "val.h5", batch_size=6,
                             dtype="float32", num_workers=1, progress=False)
    x = spec.normalize(torch.stack([ds[i]["image"] for i in range(6)]))
    with torch.inference_mode(), featlab.capture(model, ["layer2.1"]) as acts:
        model(x)
    with h5py.File(result.path, "r") as f:  # through a DataLoader worker process: the same
        np.testing.assert_array_equal(f["points/layer2.1"][:], acts["layer2.1"].numpy())
        assert json.loads(f.attrs["model"]) == spec.to_dict() and spec.seed == 3


def test_a_bad_sample_read_in_a_worker_is_one_line_and_the_fixed_run_needs_no_force(
        tmp_path, capsys, cli_state):
    from PIL import Image

    ids = ["2007_000001", "2007_000002"]
    masks = write_voc(tmp_path / "voc", {"train": ids, "val": ids}, size=(30, 44))
    bad = tmp_path / "voc" / "VOCdevkit" / "VOC2012" / "SegmentationClass" / f"{ids[1]}.png"
    Image.fromarray(np.zeros((28, 44), np.uint8)).save(bad)  # not the image's size
    argv = ["extract", "--model", "resnet18", "--weights", "none", "--data", "voc", "--root",
            str(tmp_path / "voc"), "--split", "val", "--points", "relu", "--input-size", "32",
            "--out", str(tmp_path / "c.h5"), "--quiet", "--workers", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("featlab extract: error: image and mask must have the same size; got "
                          "30x44 for ") and err.endswith("(in DataLoader worker process 0)\n")
    # fixed, and with another option: the partial file held no sample, so it is replaced
    Image.fromarray(masks[ids[1]]).save(bad)
    assert cli.main([*argv, "--dtype", "float32"]) == 0
    with h5py.File(tmp_path / "c.h5", "r") as f:
        assert f["points/relu"].dtype == np.float32
