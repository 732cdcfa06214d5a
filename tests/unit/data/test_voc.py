"""PASCAL VOC 2012 (+ SBD train_aug) from miniature trees of real JPEG, palette PNG, .mat files."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from featlab.data import load_dataset
from featlab.errors import DatasetFormatError
from featlab.data.fakes import write_sbd, write_voc, write_voc_aug
from featlab.data.voc import CLASSES
from featlab.errors import ConfigError, DatasetNotFoundError, UnknownNameError

TRAIN = ["2007_000032", "2008_000008", "2007_000033"]
VAL = ["2007_000039", "2009_000002"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory):
    root = tmp_path_factory.mktemp("voc")
    masks = write_voc(root, {"train": TRAIN, "val": VAL}, size=(30, 40))
    return root, masks


def test_classes():
    assert len(CLASSES) == 21 and CLASSES[0] == "background" and CLASSES[15] == "person"
    assert CLASSES[-1] == "tvmonitor"


def test_palette_indices_and_255_borders_come_back(voc):
    root, masks = voc
    ds = load_dataset("voc", "train", root=root)
    assert ds.ids == sorted(TRAIN) and ds.num_classes == 21
    for i, sample_id in enumerate(ds.ids):
        s = ds[i]
        assert s["id"] == sample_id and s["index"] == i
        mask = s["mask"].numpy()
        assert np.array_equal(mask, masks[sample_id])  # palette INDEX, not colour or luminance
        assert (mask == 255).any() and set(np.unique(mask).tolist()) - {255} <= set(range(21))
        assert s["image"].shape == (3, 30, 40)
    # the file really is a VOC palette PNG (class 1 drawn dark red)
    png = Image.open(root / "VOCdevkit/VOC2012/SegmentationClass" / f"{ds.ids[0]}.png")
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]


def test_image_values_match_the_jpeg(voc):
    root, _ = voc
    ds = load_dataset("voc", "val", root=root)
    for i, sample_id in enumerate(ds.ids):
        path = root / "VOCdevkit/VOC2012/JPEGImages" / f"{sample_id}.jpg"
        ref = torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255
        assert torch.equal(ds[i]["image"], ref)


def test_resized_masks_keep_labels_and_border(voc, caplog):
    root, masks = voc
    with caplog.at_level(logging.INFO, logger="featlab"):
        ds = load_dataset("voc", "val", root=root, size=16)
    assert "masks by nearest neighbour): metrics score these labels" in caplog.text  # R-2.3
    with caplog.at_level(logging.INFO, logger="featlab"):
        caplog.clear()
        load_dataset("voc", "val", root=root)  # native size: nothing resized, nothing said
    assert "resized" not in caplog.text
    for i, sample_id in enumerate(ds.ids):
        s = ds[i]
        assert s["image"].shape == (3, 16, 16) and s["mask"].shape == (16, 16)
        out = s["mask"].numpy()
        assert set(np.unique(out).tolist()) <= set(np.unique(masks[sample_id]).tolist())
        ref = TF.center_crop(TF.resize(torch.from_numpy(masks[sample_id])[None], 16,
                                       interpolation=InterpolationMode.NEAREST_EXACT), [16, 16])
        assert np.mean(out == ref[0].numpy()) > 0.9  # equal but for rounding ties
    assert any((ds[i]["mask"] == 255).any() for i in range(len(ds)))


@pytest.mark.parametrize("sub", ["", "VOCdevkit", "VOCdevkit/VOC2012"])
def test_root_may_point_at_any_level(voc, sub):
    root, _ = voc
    ds = load_dataset("voc", "trainval", root=root / sub if sub else root)
    assert ds.ids == sorted(TRAIN + VAL)


def test_missing_layout_gives_one_line_with_the_expected_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("voc", "val", root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"{tmp_path}/VOCdevkit/VOC2012/{{JPEGImages,SegmentationClass" in msg
    assert "Fix: pass root (--root) pointing at the folder that contains VOCdevkit." in msg
    with pytest.raises(DatasetNotFoundError, match="root=None"):
        load_dataset("voc", "val")


def test_missing_files_and_unknown_split(voc, tmp_path):
    root, _ = voc
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    (copy / "VOCdevkit/VOC2012/SegmentationClass/2007_000039.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 missing: '2007_000039'"):
        load_dataset("voc", "val", root=copy)
    with pytest.raises(UnknownNameError, match="train, val, trainval, train_aug"):
        load_dataset("voc", "test", root=root)
    with pytest.raises(DatasetNotFoundError, match="train_aug"):
        load_dataset("voc", "train_aug", root=root)  # neither SBD layout present


def test_bad_mask_values_and_colour_masks_raise(voc, tmp_path):
    root, masks = voc
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    seg = copy / "VOCdevkit/VOC2012/SegmentationClass"
    bad = masks[VAL[0]].copy()
    bad[0, 0] = 30
    Image.fromarray(bad).save(seg / f"{VAL[0]}.png")
    Image.fromarray(np.zeros((30, 40, 3), np.uint8)).save(seg / f"{VAL[1]}.png")
    ds = load_dataset("voc", "val", root=copy)
    with pytest.raises(DatasetFormatError, match=r"0\.\.20 or 255.*got 30"):
        ds[0]
    with pytest.raises(DatasetFormatError, match="single-channel"):
        ds[1]


def test_train_aug_from_segmentation_class_aug(voc, tmp_path):
    root, _ = voc
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    listed = TRAIN + ["2010_000001", VAL[0]]  # a val id in the list must still be left out
    aug = write_voc_aug(copy, listed)
    ds = load_dataset("voc", "train_aug", root=copy)
    assert ds.ids == sorted(TRAIN + ["2010_000001"])
    for i, sample_id in enumerate(ds.ids):
        assert np.array_equal(ds[i]["mask"].numpy(), aug[sample_id])
    assert load_dataset("voc", "train", root=copy, sbd=True).ids == ds.ids


def test_train_aug_from_the_sbd_release(voc, tmp_path):
    root, voc_masks = voc
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    sbd = write_sbd(tmp_path / "sbd", train=["2010_000005", VAL[1]], val=["2011_000007", TRAIN[0]])
    ds = load_dataset("voc", "train", root=copy, sbd=True, sbd_root=tmp_path / "sbd")
    # VOC train + SBD train + SBD val, minus every VOC val image
    assert ds.split == "train_aug"
    assert ds.ids == sorted(set(TRAIN) | {"2010_000005", "2011_000007"})
    for i, sample_id in enumerate(ds.ids):
        mask = ds[i]["mask"].numpy()
        expected = voc_masks.get(sample_id, sbd.get(sample_id))  # VOC's own mask first
        assert np.array_equal(mask, expected)
        assert ds[i]["image"].shape == (3, 30, 40)
    settings = ds.settings()
    assert settings["split"] == "train_aug" and settings["sbd_root"] == str(tmp_path / "sbd")
    assert load_dataset(**settings).ids == ds.ids
    # SBD is also found next to VOCdevkit without sbd_root
    shutil.copytree(tmp_path / "sbd" / "benchmark_RELEASE", copy / "benchmark_RELEASE")
    assert load_dataset("voc", "train_aug", root=copy).ids == ds.ids


def test_length_keeps_the_first_sorted_samples(voc):
    root, _ = voc
    ds = load_dataset("voc", "trainval", root=root, length=2)
    assert ds.ids == sorted(TRAIN + VAL)[:2] and ds.settings()["length"] == 2
    with pytest.raises(ConfigError, match="length"):
        load_dataset("voc", "val", root=root, length=3)
