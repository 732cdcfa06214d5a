"""Joint resize + centre crop, checked against torchvision's tensor implementation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from featlab.data.base import image_to_tensor
from featlab.data.fakes import blocky_labels, with_border
from featlab.data.transforms import center_crop_box, resize_and_center_crop, resized_shape
from featlab.errors import ConfigError

CASES = [(375, 500, 128), (500, 375, 96), (37, 53, 16), (20, 30, 45), (101, 99, 64), (64, 64, 64)]


@pytest.mark.parametrize("h,w,size", CASES)
def test_matches_torchvision_resize_then_center_crop(h, w, size):
    rng = np.random.default_rng(h * w)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = with_border(blocky_labels(rng, (h, w), [0, 3, 7, 20], block=6))
    out_image, out_mask = resize_and_center_crop(image, mask, size)
    assert out_image.shape == (size, size, 3) and out_mask.shape == (size, size)
    assert out_image.dtype == np.uint8 and out_mask.dtype == np.uint8

    # the mask: exactly torchvision's pixel-centred nearest ("nearest-exact") + center_crop
    ref_mask = TF.center_crop(TF.resize(torch.from_numpy(mask)[None], size,
                                        interpolation=InterpolationMode.NEAREST_EXACT),
                              [size, size])[0].numpy()
    # ... except at exact ties (an output centre on a source pixel edge), which Pillow and
    # torch round apart; only rows/columns of ties may differ
    new_h, new_w = resized_shape(h, w, size)
    top, left = center_crop_box(new_h, new_w, size)
    src_rows = (np.arange(top, top + size) + 0.5) * h / new_h
    src_cols = (np.arange(left, left + size) + 0.5) * w / new_w
    tie_rows = np.isclose(src_rows, np.round(src_rows), atol=1e-6)
    tie_cols = np.isclose(src_cols, np.round(src_cols), atol=1e-6)
    differ = out_mask != ref_mask
    assert not (differ & ~(tie_rows[:, None] | tie_cols[None, :])).any()
    assert differ.mean() < 0.05
    # the image: torchvision's antialiased bilinear resize on tensors, within rounding
    ref_image = TF.center_crop(TF.resize(torch.from_numpy(image).permute(2, 0, 1), size,
                                         interpolation=InterpolationMode.BILINEAR,
                                         antialias=True), [size, size]).permute(1, 2, 0).numpy()
    assert np.abs(out_image.astype(int) - ref_image.astype(int)).max() <= 1


def test_mask_values_stay_in_the_original_label_set_and_255_survives():
    rng = np.random.default_rng(0)
    mask = with_border(blocky_labels(rng, (90, 120), [0, 1, 15], block=10))
    values = set(np.unique(mask).tolist())
    assert 255 in values
    image = np.zeros((90, 120, 3), np.uint8)
    for size in (17, 32, 64, 200):  # down and up
        _, out = resize_and_center_crop(image, mask, size)
        assert set(np.unique(out).tolist()) <= values
        assert 255 in set(np.unique(out).tolist()) or size < 32


def test_shape_rules_match_torchvision():
    for h, w, size in CASES:
        resized = TF.resize(torch.zeros(1, h, w), size, antialias=False)
        assert resized_shape(h, w, size) == tuple(resized.shape[-2:])
        # center_crop of a tensor whose values are the row/column index reveals the offset
        rows = torch.arange(resized.shape[-2])[:, None].expand(resized.shape[-2:]).float()
        cols = torch.arange(resized.shape[-1])[None, :].expand(resized.shape[-2:]).float()
        top = int(TF.center_crop(rows[None], [size, size])[0, 0, 0])
        left = int(TF.center_crop(cols[None], [size, size])[0, 0, 0])
        assert center_crop_box(*resized.shape[-2:], size) == (top, left)


def test_accepts_pil_images_and_rejects_mismatched_sizes():
    image = Image.new("RGB", (40, 30), (10, 200, 30))
    out_image, out_mask = resize_and_center_crop(image, np.zeros((30, 40), np.uint8), 20)
    assert out_image.shape == (20, 20, 3) and (out_image == [10, 200, 30]).all()
    with pytest.raises(ValueError, match="same size"):
        resize_and_center_crop(image, np.zeros((40, 30), np.uint8), 20)
    with pytest.raises(ConfigError, match="size"):
        resize_and_center_crop(image, np.zeros((30, 40), np.uint8), 0)


def test_image_to_tensor_scales_to_unit_range():
    image = np.array([[[0, 51, 255]]], np.uint8)
    t = image_to_tensor(image)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert t.flatten().tolist() == pytest.approx([0.0, 0.2, 1.0])
