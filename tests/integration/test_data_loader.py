"""Data sets through ``torch.utils.data.DataLoader`` with worker processes."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from featlab.data import load_dataset
from featlab.data.fakes import write_voc


def batches(ds, workers, batch_size=4):
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return list(loader)


def test_shapes_are_the_same_in_workers_as_in_the_main_process():
    ds = load_dataset("shapes", "val", size=48, length=10)
    parallel = batches(ds, workers=2)
    assert [b["image"].shape for b in parallel] == [(4, 3, 48, 48)] * 2 + [(2, 3, 48, 48)]
    images = torch.cat([b["image"] for b in parallel])
    masks = torch.cat([b["mask"] for b in parallel])
    assert masks.dtype == torch.uint8
    # a fresh object in this process renders the same samples, in the same order
    fresh = load_dataset("shapes", "val", size=48, length=10)
    assert torch.equal(images, torch.stack([fresh[i]["image"] for i in range(10)]))
    assert torch.equal(masks, torch.stack([fresh[i]["mask"] for i in range(10)]))
    assert sum((b["id"] for b in parallel), []) == fresh.ids
    assert torch.cat([b["index"] for b in parallel]).tolist() == list(range(10))


def test_voc_files_stack_into_batches_in_sorted_order(tmp_path):
    ids = [f"2007_{k:06d}" for k in (9, 3, 5, 1, 7)]
    write_voc(tmp_path, {"train": ids[:3], "val": ids[3:]}, size=(30, 44))
    ds = load_dataset("voc", "trainval", root=tmp_path, size=24)
    parallel = batches(ds, workers=2, batch_size=2)
    serial = batches(ds, workers=0, batch_size=2)
    assert sum((b["id"] for b in parallel), []) == sorted(ids)
    for a, b in zip(parallel, serial):
        assert a["image"].shape[1:] == (3, 24, 24) and a["mask"].shape[1:] == (24, 24)
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert any((b["mask"] == 255).any() for b in parallel)
