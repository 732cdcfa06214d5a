"""Joint image/mask transforms: resize the shorter side, then centre-crop a square.

The image is resized bilinearly with antialiasing (Pillow's resampling filters widen their
support when they shrink), the mask with NEAREST only, so that a resized mask never holds a
value that was not in the original (no blended class indices, no blurred 255 borders).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from featlab.data.base import check_size


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """``(H, W)`` after scaling the shorter side to ``size`` (torchvision's ``Resize(int)`` rule:
    the longer side is truncated, ``int(size * long / short)``).

    Examples:
        >>> resized_shape(375, 500, 128)
        (128, 170)
    """
    if height <= width:
        return size, max(size, int(size * width / height))
    return max(size, int(size * height / width)), size


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """Top-left ``(top, left)`` of the centred ``size x size`` crop (torchvision's rounding).

    Examples:
        >>> center_crop_box(128, 170, 128)
        (0, 21)
    """
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def resize_and_center_crop(image: Image.Image | np.ndarray, mask: np.ndarray,
                           size: int) -> tuple[np.ndarray, np.ndarray]:
    """Resize the shorter side to ``size`` and centre-crop ``size x size``, jointly.

    Args:
        image: RGB ``PIL.Image`` or uint8 array ``[H, W, 3]``.
        mask: uint8 array ``[H, W]`` of class indices (255 = ignore), same size as the image.
        size: side of the output square.

    Returns:
        ``(image uint8 [size, size, 3], mask uint8 [size, size])``.

    Examples:
        >>> img = np.zeros((30, 40, 3), np.uint8)
        >>> msk = np.full((30, 40), 255, np.uint8); msk[10:20, 10:30] = 7
        >>> out_img, out_msk = resize_and_center_crop(img, msk, 15)
        >>> out_img.shape, out_msk.shape, sorted(np.unique(out_msk).tolist())
        ((15, 15, 3), (15, 15), [7, 255])
    """
    size = check_size(size)
    assert size is not None, "callers skip the transform for native size"
    # uint8 [H, W, 3] -> "RGB" and uint8 [H, W] -> "L": Pillow infers the mode from the array
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    mask = np.asarray(mask, np.uint8)
    width, height = pil.size
    if mask.shape != (height, width):
        raise ValueError(f"image and mask must have the same size; got image {height}x{width} "
                         f"and mask {mask.shape[0]}x{mask.shape[1]}")
    new_h, new_w = resized_shape(height, width, size)
    top, left = center_crop_box(new_h, new_w, size)
    box = (left, top, left + size, top + size)
    if (new_h, new_w) != (height, width):
        pil = pil.resize((new_w, new_h), Image.Resampling.BILINEAR)
        mask_pil = Image.fromarray(mask).resize((new_w, new_h), Image.Resampling.NEAREST)
    else:
        mask_pil = Image.fromarray(mask)
    # np.array (a writable copy), not np.asarray: torch.from_numpy warns on read-only arrays
    out_image = np.array(pil.crop(box).convert("RGB"))
    out_mask = np.array(mask_pil.crop(box))
    return out_image, out_mask
