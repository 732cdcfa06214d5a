"""Cityscapes from a miniature tree: labelIds -> train ids, labelTrainIds preferred, errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featlab.data import load_dataset
from featlab.errors import DatasetFormatError
from featlab.data.cityscapes import CLASSES, LABEL_ID_TO_TRAIN_ID
from featlab.data.fakes import write_cityscapes
from featlab.errors import DatasetNotFoundError, UnknownNameError

# the 19 evaluated classes of cityscapesScripts' labels.py as (labelId, name), trainId order
EVALUATED = [(7, "road"), (8, "sidewalk"), (11, "building"), (12, "wall"), (13, "fence"),
             (17, "pole"), (19, "traffic light"), (20, "traffic sign"), (21, "vegetation"),
             (22, "terrain"), (23, "sky"), (24, "person"), (25, "rider"), (26, "car"),
             (27, "truck"), (28, "bus"), (31, "train"), (32, "motorcycle"), (33, "bicycle")]


@pytest.fixture(scope="module")
def city(tmp_path_factory):
    root = tmp_path_factory.mktemp("cityscapes")
    raw = write_cityscapes(root, {"train": {"bochum": 1, "aachen": 2}, "val": {"lindau": 1}})
    return root, raw


def test_the_table_is_the_official_one():
    assert [name for _, name in EVALUATED] == list(CLASSES)
    assert {lid: tid for tid, (lid, _) in enumerate(EVALUATED)} == {
        k: v for k, v in LABEL_ID_TO_TRAIN_ID.items() if v != 255}
    assert sorted(LABEL_ID_TO_TRAIN_ID) == list(range(34))


def test_label_ids_become_train_ids(city):
    root, raw = city
    ds = load_dataset("cityscapes", "train", root=root)
    assert ds.ids == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000020",
                      "bochum/bochum_000000_000019"]
    assert ds.num_classes == 19
    expected = {lid: tid for tid, (lid, _) in enumerate(EVALUATED)}  # others: 255
    seen = set()
    for i, sample_id in enumerate(ds.ids):
        mask, labels = ds[i]["mask"].numpy(), raw[sample_id]
        assert ds[i]["image"].shape == (3, 16, 32)
        for v in np.unique(labels).tolist():
            assert (mask[labels == v] == expected.get(v, 255)).all(), v
            seen.add(v)
    # the tree exercised road 7 -> 0, car 26 -> 13, unlabeled 0 -> 255, guard rail 14 -> 255
    assert {0, 7, 14, 26} <= seen and expected[7] == 0 and expected[26] == 13


def test_label_train_ids_are_used_when_present(tmp_path):
    write_cityscapes(tmp_path, {"val": {"lindau": 2}}, train_ids=True)
    ds = load_dataset("cityscapes", "val", root=tmp_path, size=8)
    for i in range(len(ds)):
        assert (ds[i]["mask"] == 0).all()  # the all-zero labelTrainIds file, not labelIds
        assert ds[i]["image"].shape == (3, 8, 8)


def test_unexpected_label_ids_raise(tmp_path):
    write_cityscapes(tmp_path, {"val": {"lindau": 1}}, values=(7, 40))
    ds = load_dataset("cityscapes", "val", root=tmp_path)
    with pytest.raises(DatasetFormatError, match="got 40"):
        ds[0]


def test_missing_layout_split_and_masks(city, tmp_path):
    root, _ = city
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("cityscapes", "val", root=tmp_path)
    assert "\n" not in str(e.value) and "leftImg8bit,gtFine" in str(e.value)
    with pytest.raises(DatasetNotFoundError, match="test split not found"):
        load_dataset("cityscapes", "test", root=root)
    with pytest.raises(UnknownNameError, match="train, val, test"):
        load_dataset("cityscapes", "training", root=root)
    write_cityscapes(tmp_path / "c", {"val": {"ulm": 1}})
    next((tmp_path / "c/gtFine/val/ulm").glob("*labelIds.png")).unlink()
    with pytest.raises(DatasetNotFoundError, match="1 missing: 'ulm/ulm_000000_000019'"):
        load_dataset("cityscapes", "val", root=tmp_path / "c")


def test_root_may_be_the_parent_folder(city):
    root, _ = city
    ds = load_dataset("cityscapes", "val", root=root.parent / root.name)
    assert ds.ids == ["lindau/lindau_000000_000019"]
    Image.open(ds.paths(0)[0]).verify()
