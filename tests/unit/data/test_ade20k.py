"""ADE20K SceneParsing from a miniature tree: 0 -> 255, k -> k - 1, split names, errors."""

from __future__ import annotations

import numpy as np
import pytest

from featlab.data import load_dataset
from featlab.data.ade20k import CLASSES
from featlab.errors import DatasetFormatError
from featlab.data.fakes import write_ade20k
from featlab.errors import DatasetNotFoundError, UnknownNameError


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    root = tmp_path_factory.mktemp("ade")
    raw = write_ade20k(root, {"training": 3, "validation": 2})
    return root, raw


def test_classes():
    assert len(CLASSES) == 150 and len(set(CLASSES)) == 150
    assert (CLASSES[0], CLASSES[2], CLASSES[12], CLASSES[149]) == ("wall", "sky", "person", "flag")


def test_other_becomes_ignore_and_classes_shift_down(ade):
    root, raw = ade
    ds = load_dataset("ade20k", "train", root=root)
    assert ds.ids == ["ADE_train_00000001", "ADE_train_00000002", "ADE_train_00000003"]
    assert ds.num_classes == 150
    for i, sample_id in enumerate(ds.ids):
        mask, ann = ds[i]["mask"].numpy(), raw[sample_id]
        expected = np.where(ann == 0, 255, ann.astype(int) - 1)
        assert np.array_equal(mask, expected)
        assert (mask[ann == 150] == 149).all() and (mask[ann == 1] == 0).all()
    assert any((raw[s] == 0).any() for s in ds.ids)


def test_val_split_reads_validation_and_root_may_be_the_release_folder(ade):
    root, _ = ade
    ds = load_dataset("ade20k", "val", root=root / "ADEChallengeData2016", size=12)
    assert ds.ids == ["ADE_val_00000001", "ADE_val_00000002"]
    assert ds[1]["image"].shape == (3, 12, 12) and ds[1]["mask"].shape == (12, 12)
    with pytest.raises(UnknownNameError, match="train, val"):
        load_dataset("ade20k", "validation", root=root)


def test_values_above_150_raise(tmp_path):
    write_ade20k(tmp_path, {"validation": 1}, values=(0, 151))
    with pytest.raises(DatasetFormatError, match="got 151"):
        load_dataset("ade20k", "val", root=tmp_path)[0]


def test_missing_layout_and_annotations(ade, tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("ade20k", "train", root=tmp_path)
    assert "\n" not in str(e.value)
    assert f"{tmp_path}/ADEChallengeData2016/{{images,annotations}}" in str(e.value)
    write_ade20k(tmp_path / "a", {"training": 2})
    (tmp_path / "a/ADEChallengeData2016/annotations/training/ADE_train_00000002.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 missing: 'ADE_train_00000002'"):
        load_dataset("ade20k", "train", root=tmp_path / "a")
