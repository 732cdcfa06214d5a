"""Tiny shapes caches of TinyResNet (32 px) for the head, trainer and sweep tests."""

from __future__ import annotations

from pathlib import Path

import pytest

import featlab
import featlab.testing as ft
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


def make_caches(folder, n_train=48, n_val=16, seed=0, size=32):
    """Write ``train.h5`` and ``val.h5`` (all points of TinyResNet) into ``folder``."""
    for split, n in (("train", n_train), ("val", n_val)):
        ds = featlab.load_dataset("shapes", split=split, size=size, length=n)
        featlab.extract(ft.TinyResNet(seed=seed), ds, "all", folder / f"{split}.h5", spec=SPEC,
                        batch_size=16, dtype="float32", num_workers=0, progress=False)
    return folder / "train.h5", folder / "val.h5"


@pytest.fixture(scope="session")
def caches(tmp_path_factory):
    return make_caches(tmp_path_factory.mktemp("segcaches"))


@pytest.fixture
def reads(monkeypatch):
    """Every array a test reads whole into a tensor, as (file name, array name)."""
    from featlab.cache.arrays import CacheArray

    seen, read = [], CacheArray.torch

    def counted(self, key=slice(None)):
        seen.append((Path(self._reader.path).stem, self.name))
        return read(self, key)

    monkeypatch.setattr(CacheArray, "torch", counted)
    return seen
