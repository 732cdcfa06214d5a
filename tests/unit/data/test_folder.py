"""The generic ``folder`` layout: classes.txt, splits, label checks (R-2.2)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from featlab.data import load_dataset
from featlab.errors import DatasetFormatError
from featlab.data.fakes import write_folder
from featlab.errors import DatasetNotFoundError, FeatlabWarning, UnknownNameError

CLASSES = ("background", "cat", "dog")
STEMS = ["b", "a", "sub/c", "d"]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    raw = write_folder(root, classes=CLASSES, stems=STEMS,
                       splits={"train": ["d", "a.jpg", "sub/c"], "val": ["b"]})
    return root, raw


def test_classes_splits_and_values(tree):
    root, raw = tree
    train = load_dataset("folder", "train", root=root)
    assert train.classes == CLASSES and train.num_classes == 3
    assert train.ids == ["a", "d", "sub/c"]  # sorted; suffixes in the list are dropped
    for i, stem in enumerate(train.ids):
        assert np.array_equal(train[i]["mask"].numpy(), raw[stem])
        assert train[i]["image"].shape == (3, 20, 28)
    assert load_dataset("folder", "val", root=root).ids == ["b"]
    assert load_dataset("folder", "all", root=root).ids == sorted(STEMS)


def test_unknown_split_lists_the_available_ones(tree):
    root, _ = tree
    with pytest.raises(UnknownNameError, match="must be one of train, val, all; got 'test'"):
        load_dataset("folder", "test", root=root)


def test_without_splits_every_split_is_every_image(tmp_path):
    write_folder(tmp_path, classes=CLASSES, stems=["x", "y"], suffix=".png")
    assert load_dataset("folder", "all", root=tmp_path).ids == ["x", "y"]
    with pytest.warns(FeatlabWarning, match="no splits/ folder"):
        ds = load_dataset("folder", "train", root=tmp_path, size=10)
    assert ds.ids == ["x", "y"] and ds[1]["mask"].shape == (10, 10)


def test_binary_0_255_masks_raise(tmp_path):
    write_folder(tmp_path, classes=("background", "lesion"), stems=["m"])
    binary = np.zeros((20, 28), np.uint8)
    binary[5:15, 5:20] = 255
    Image.fromarray(binary).save(tmp_path / "masks" / "m.png")
    with pytest.raises(DatasetFormatError, match="only 0 and 255.*mask // 255"):
        load_dataset("folder", "all", root=tmp_path)[0]
    # opted out: 255 is ignore, as everywhere
    ds = load_dataset("folder", "all", root=tmp_path, check_binary=False)
    assert np.array_equal(ds[0]["mask"].numpy(), binary)


def test_a_background_only_mask_with_ignored_pixels_is_read_when_classes_are_many(tmp_path):
    # with three classes a 0/255 mask cannot be a binary mask saved as 0/255: an image of
    # background only, with an ignored border, is valid data
    write_folder(tmp_path, classes=CLASSES, stems=["m"])
    mask = np.zeros((20, 28), np.uint8)
    mask[:2], mask[-2:] = 255, 255
    Image.fromarray(mask).save(tmp_path / "masks" / "m.png")
    assert np.array_equal(load_dataset("folder", "all", root=tmp_path)[0]["mask"].numpy(), mask)


def test_values_at_or_above_num_classes_raise(tmp_path):
    write_folder(tmp_path, classes=CLASSES, stems=["m"])
    mask = np.zeros((20, 28), np.uint8)
    mask[0, :3] = [1, 2, 3]  # 3 is not a class of a 3-class set
    Image.fromarray(mask).save(tmp_path / "masks" / "m.png")
    with pytest.raises(DatasetFormatError, match=r"0\.\.2 or 255.*got 3"):
        load_dataset("folder", "all", root=tmp_path)[0]


def test_missing_pieces(tree, tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("folder", "all", root=tmp_path)
    assert "\n" not in str(e.value) and "{images/*.jpg|png,masks/*.png,classes.txt}" in str(e.value)
    write_folder(tmp_path / "f", classes=CLASSES, stems=["p", "q"])
    (tmp_path / "f/masks/q.png").unlink()
    with pytest.raises(DatasetNotFoundError, match="1 missing: 'q'"):
        load_dataset("folder", "all", root=tmp_path / "f")
    (tmp_path / "f/splits").mkdir()
    (tmp_path / "f/splits/train.txt").write_text("p\nzzz\n")
    with pytest.raises(DatasetNotFoundError, match="'zzz'"):
        load_dataset("folder", "train", root=tmp_path / "f")


def test_bad_classes_file_and_duplicate_stems(tmp_path):
    write_folder(tmp_path, classes=("a", "b", "a"), stems=["p"])
    with pytest.raises(DatasetFormatError, match="unique"):
        load_dataset("folder", "all", root=tmp_path)
    write_folder(tmp_path / "g", classes=("a", "b"), stems=["p"])
    Image.new("RGB", (28, 20)).save(tmp_path / "g/images/p.png")
    with pytest.raises(DatasetFormatError, match="stems must be unique"):
        load_dataset("folder", "all", root=tmp_path / "g")
