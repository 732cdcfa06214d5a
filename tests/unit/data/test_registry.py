"""``load_dataset`` / ``list_datasets``: names, options, settings round trips."""

from __future__ import annotations

import pytest

import featlab
from featlab.data import list_datasets, load_dataset
from featlab.data.base import SegmentationDataset
from featlab.data.fakes import write_ade20k, write_cityscapes, write_folder, write_voc
from featlab.errors import ConfigError, UnknownNameError


def test_names():
    assert list_datasets() == ["ade20k", "cityscapes", "folder", "shapes", "voc"]
    assert featlab.load_dataset is load_dataset and featlab.list_datasets is list_datasets


def test_unknown_name_suggests():
    with pytest.raises(UnknownNameError, match="got 'cityscape'. Did you mean 'cityscapes'"):
        load_dataset("cityscape")


def test_unknown_option_suggests():
    with pytest.raises(ConfigError, match="got 'num_object'. Did you mean 'num_objects'"):
        load_dataset("shapes", num_object=3)


def test_every_data_set_rebuilds_from_its_settings(tmp_path):
    write_voc(tmp_path / "voc", {"train": ["2007_000001"], "val": ["2007_000002"]})
    write_cityscapes(tmp_path / "cs", {"val": {"ulm": 1}})
    write_ade20k(tmp_path / "ade", {"validation": 1})
    write_folder(tmp_path / "folder", classes=("a", "b"), stems=["x"])
    built = [
        load_dataset("shapes", "val", size=16, length=2),
        load_dataset("voc", "val", root=tmp_path / "voc", size=16),
        load_dataset("cityscapes", "val", root=tmp_path / "cs", size=16),
        load_dataset("ade20k", "val", root=tmp_path / "ade", size=16),
        load_dataset("folder", "all", root=tmp_path / "folder", size=16),
    ]
    for ds in built:
        assert isinstance(ds, SegmentationDataset)
        settings = ds.settings()
        assert {"name", "split", "root", "size", "seed"} <= set(settings)
        again = load_dataset(**settings)
        assert type(again) is type(ds) and again.ids == ds.ids and again.settings() == settings
        s = again[0]
        assert s["image"].shape == (3, 16, 16) and s["mask"].shape == (16, 16)
        assert ds.name in repr(ds)


def test_data_sets_pickle_for_spawned_workers(tmp_path):
    import pickle

    import torch

    write_folder(tmp_path, classes=("a", "b"), stems=["x", "y"])
    for ds in (load_dataset("shapes", "train", size=16, length=3),
               load_dataset("folder", "all", root=tmp_path, size=16)):
        again = pickle.loads(pickle.dumps(ds))
        assert again.ids == ds.ids and torch.equal(again[1]["image"], ds[1]["image"])
