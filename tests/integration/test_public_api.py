"""The design card's Public API, line by line, behaves as shown there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import featlab


@pytest.mark.slow
def test_design_public_api_end_to_end(tmp_path):
    model, spec = featlab.get_backbone("resnet18", weights="none")
    points = featlab.skip_points(model, input_size=64)
    assert [p.index for p in points] == list(range(len(points)))
    stages = featlab.select_points(points, "stages")
    assert [p.stride for p in stages] == [2, 4, 8, 16, 32]

    ds = featlab.load_dataset("shapes", split="val", size=64, length=6)
    x = spec.normalize(torch.stack([ds[i]["image"] for i in range(len(ds))]))
    with featlab.capture(model, ["layer3", "layer4"]) as acts:
        model(x)
    assert acts["layer3"].shape == (6, 256, 4, 4)

    # no spec passed: get_backbone's spec rides on the model
    featlab.extract(model, ds, "stages", tmp_path / "val.h5", batch_size=4, dtype="float32",
                    progress=False, num_workers=0)
    cache = featlab.open_cache(tmp_path / "val.h5")
    assert [p.name for p in cache.points] == [p.name for p in stages]
    assert list(cache.ids) == ds.ids
    np.testing.assert_allclose(cache["layer3.1"][:], acts["layer3"].numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.labels[:], torch.stack([ds[i]["mask"] for i in range(6)]))
