"""Training pixels for dense probes: seeded subsampling and bilinear features at label pixels.

A probe's logits are computed on the native feature grid and upsampled bilinearly to the label
size (R-10.2). Bilinear upsampling is linear with weights that sum to one, so the upsampled
logit at a label pixel equals the linear probe applied to the *bilinearly upsampled feature* at
that pixel. Training on those features (sampled at label pixels) therefore fits exactly the
model that is evaluated, without ever resizing labels and without materialising the full
upsampled feature map: :func:`bilinear_at` reads the four neighbouring cells of each sampled
pixel, with the same source-coordinate rule as ``F.interpolate(mode="bilinear",
align_corners=False)``.

Everything here streams over lazy ``[N, ...]`` arrays (``cache[name]``, ``cache.labels``,
numpy arrays, tensors), ``batch_size`` images at a time, so memory is bounded by the number of
sampled pixels, not by the data set.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from featlab.allocator import release_freed_memory
from featlab.errors import ConfigError

__all__ = ["bilinear_at", "batches", "as_tensor", "PixelSample", "sample_pixels"]

#: Batches between two returns of freed memory to the kernel in :func:`sample_pixels`. The
#: small arrays it keeps land in the freed temporaries of a batch, so without them the heap
#: grew by ~0.5 MB per image (a 64 x 64 x 64 point); each return costs page faults after it.
TRIM_EVERY = 8


def as_tensor(x: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A torch tensor view/copy of a numpy array or tensor (float16 is cast when ``dtype``)."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    return t if dtype is None else t.to(dtype)


def batches(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(n, start + batch_size))


def _source(dst: torch.Tensor, in_size: int, out_size: int) -> tuple[torch.Tensor, ...]:
    """Neighbour indices and weight along one axis, as ``F.interpolate(bilinear)`` computes."""
    scale = in_size / out_size
    src = ((dst.to(torch.float64) + 0.5) * scale - 0.5).clamp_(min=0.0)
    lo = src.floor().long().clamp_(max=in_size - 1)
    hi = (lo + 1).clamp_(max=in_size - 1)
    return lo, hi, (src - lo).to(torch.float32)


def bilinear_at(features: torch.Tensor, b: torch.Tensor, y: torch.Tensor, x: torch.Tensor,
                size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly upsampled features at chosen output pixels, without upsampling the map.

    Args:
        features: ``[B, C, h, w]`` float tensor.
        b, y, x: int64 ``[n]`` image index and pixel row/column in the output grid.
        size: output ``(H, W)``.

    Returns:
        ``[n, C]``: ``F.interpolate(features, size, mode="bilinear")[b, :, y, x]``.

    Examples:
        >>> import torch.nn.functional as F
        >>> f = torch.randn(2, 3, 4, 5)
        >>> b, y, x = torch.tensor([0, 1]), torch.tensor([0, 10]), torch.tensor([15, 3])
        >>> up = F.interpolate(f, size=(11, 16), mode="bilinear", align_corners=False)
        >>> torch.allclose(bilinear_at(f, b, y, x, (11, 16)), up[b, :, y, x], atol=1e-6)
        True
    """
    h, w = features.shape[-2:]
    y0, y1, wy = _source(y, h, size[0])
    x0, x1, wx = _source(x, w, size[1])
    wy, wx = wy[:, None].to(features.dtype), wx[:, None].to(features.dtype)
    f = features
    top = f[b, :, y0, x0] * (1 - wx) + f[b, :, y0, x1] * wx
    bottom = f[b, :, y1, x0] * (1 - wx) + f[b, :, y1, x1] * wx
    return top * (1 - wy) + bottom * wy


@dataclass
class PixelSample:
    """Sampled training pixels, stored the way the probe computes them.

    Each sampled pixel's bilinear feature is ``sum_j w[i, j] * cells[idx[i, j]]`` over its four
    neighbouring feature cells, so the sample keeps the referenced cells ``cells`` [m, C] once,
    and ``idx`` [n, 4] / ``w`` [n, 4] per pixel. A probe's logits are then computed on the cells
    (``m`` rows, ``m`` is ~``n / stride^2`` for dense samples) and interpolated to the pixels
    (four K-vectors per pixel): exactly the model that is evaluated, at a fraction of the cost.

    When every labelled pixel is kept (no subsampling), the sample is *dense*: ``cells`` holds
    every cell of the images with labelled pixels, in ``[image, row, col]`` order (``grid`` =
    ``(images, h, w)``), and ``label_map`` [images, H, W] their labels (``ignore_index``
    elsewhere). A probe then upsamples whole logit maps (bilinearly, as ``F.interpolate``),
    several times faster than interpolating four cells per pixel.
    """

    cells: np.ndarray        # [m, C] float32
    idx: np.ndarray          # [n, 4] int64 rows of ``cells``
    w: np.ndarray            # [n, 4] float32 bilinear weights (rows sum to 1)
    y: np.ndarray            # [n] int64 labels
    image: np.ndarray        # [n] int64 source image of each pixel
    mean: np.ndarray         # [C] float64 exact mean of the pixel features
    var: np.ndarray          # [C] float64 exact variance of the pixel features
    num_valid: int           # non-ignored label pixels in the whole input
    max_label: int           # largest non-ignored label (-1 if none)
    label_size: tuple[int, int]
    grid: tuple[int, int, int] | None = None  # dense samples: (images, h, w) of ``cells``
    label_map: np.ndarray | None = None       # dense samples: [images, H, W] int64 labels

    @property
    def X(self) -> np.ndarray:
        """The pixel features ``[n, C]`` themselves (materialised; for baselines and tests)."""
        return (self.cells[self.idx] * self.w[:, :, None]).sum(1, dtype=np.float32)


def _neighbours(b: torch.Tensor, y: torch.Tensor, x: torch.Tensor, hw: tuple[int, int],
                size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat cell keys ``b * h * w + row * w + col`` [n, 4] and bilinear weights [n, 4]."""
    h, w = hw
    y0, y1, wy = _source(y, h, size[0])
    x0, x1, wx = _source(x, w, size[1])
    base = b * (h * w)
    keys = torch.stack([base + y0 * w + x0, base + y0 * w + x1, base + y1 * w + x0,
                        base + y1 * w + x1], 1)
    weights = torch.stack([(1 - wy) * (1 - wx), (1 - wy) * wx, wy * (1 - wx), wy * wx], 1)
    return keys, weights


_MOMENT_CHUNK = 1 << 20  # upsampled values at once (bigger blocks: slower, page faults)


def _dense_moments(feats: torch.Tensor, valid: torch.Tensor, size: tuple[int, int]
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Sums of the bilinear pixel features and of their squares over ``valid`` [B, H, W]
    pixels, in float64, upsampling a block of channels at a time (memory stays bounded)."""
    b, c = feats.shape[:2]
    step = max(1, _MOMENT_CHUNK // max(1, b * size[0] * size[1]))
    mask = valid[:, None].to(feats.dtype)
    s1, s2 = np.zeros(c), np.zeros(c)
    for lo in range(0, c, step):
        up = F.interpolate(feats[:, lo:lo + step], size=size, mode="bilinear",
                           align_corners=False).mul_(mask)
        s1[lo:lo + step] = up.sum((2, 3)).double().sum(0).numpy()  # float32 within an image
        s2[lo:lo + step] = up.mul_(up).sum((2, 3)).double().sum(0).numpy()
    return s1, s2


#: Peak memory of a dense probe over its float32 features: the cells, their standardised and
#: whitened copies, logit maps and gradients (resnet18 relu, 64 x 64 x 64, 300 images: 7.8x).
DENSE_MEMORY_FACTOR = 9


def _check_dense_fits(X: Any, images: int, size: tuple[int, int]) -> None:
    """Refuse a dense probe (every labelled pixel) that would not fit in memory."""
    from featlab.allocator import available_memory
    from featlab.cache.plan import format_bytes

    c, h, w = (int(v) for v in X.shape[1:])
    need = DENSE_MEMORY_FACTOR * images * c * h * w * 4 + images * size[0] * size[1] * 8
    free = available_memory()
    if free is not None and need > free:
        raise ConfigError(
            f"a probe on every labelled pixel must fit in memory; {images} images of "
            f"{c}x{h}x{w} features need about {format_bytes(need)} ({DENSE_MEMORY_FACTOR}x "
            f"their float32 cells), and {format_bytes(free)} is available. Fix: sample pixels "
            "(--max-pixels N; the default keeps 100,000), or probe fewer images.")


def sample_pixels(X: Any, y: Any, *, max_pixels: int | None, seed: int, ignore_index: int,
                  batch_size: int, shuffle_labels: bool = False, progress: bool = False
                  ) -> PixelSample:
    """Stream over ``[N, C, h, w]`` features and ``[N, H, W]`` labels; keep a seeded sample.

    A first pass over the labels counts the non-ignored pixels of every image; a uniform sample
    of ``max_pixels`` of them (all when there are fewer: a dense sample) is drawn with
    ``np.random.default_rng(seed)``; a second pass reads the features of each batch and keeps
    the cells the sampled pixels interpolate from (see :class:`PixelSample`). ``shuffle_labels``
    permutes each image's non-ignored labels spatially first (the null baseline of R-10.3:
    class frequencies per image are kept, spatial correspondence is destroyed).
    """
    from tqdm.auto import tqdm

    n = len(X)
    size = tuple(int(s) for s in y.shape[1:])
    counts = np.zeros(n, np.int64)
    max_label = -1
    for sl in batches(n, batch_size):
        lab = np.asarray(y[sl])
        valid = lab != ignore_index
        counts[sl] = valid.reshape(len(lab), -1).sum(1)
        if valid.any():
            max_label = max(max_label, int(lab[valid].max()))
    total = int(counts.sum())
    rng = np.random.default_rng(seed)
    dense = max_pixels is None or total <= max_pixels
    if max_pixels is None:
        _check_dense_fits(X, int(np.count_nonzero(counts)), size)
    if dense:
        chosen = np.arange(total, dtype=np.int64)
    else:
        chosen = np.sort(rng.choice(total, size=max_pixels, replace=False))
    offsets = np.concatenate([[0], np.cumsum(counts)])
    starts = np.searchsorted(chosen, offsets)  # chosen[starts[i]:starts[i+1]] lie in image i
    shuffle_rng = np.random.default_rng([seed, 1])
    c = X.shape[1]
    cells, idxs, ws, ys, imgs, maps = [], [], [], [], [], []
    m = kept = 0
    hw = None
    s1, s2 = np.zeros(c), np.zeros(c)
    for sl in tqdm(list(batches(n, batch_size)), desc="probe pixels", unit="batch",
                   disable=not progress, leave=False):
        lab = np.asarray(y[sl]).reshape(sl.stop - sl.start, -1)
        bs, pos, labels = [], [], []
        lab_map = np.full(lab.shape, ignore_index, np.int64) if dense else None
        for k, i in enumerate(range(sl.start, sl.stop)):
            ranks = chosen[starts[i]:starts[i + 1]] - offsets[i]
            if not len(ranks) and not shuffle_labels:
                continue
            flat = np.flatnonzero(lab[k] != ignore_index)
            values = lab[k][flat]
            if shuffle_labels:  # drawn for every image, so the stream does not depend on sampling
                values = values[shuffle_rng.permutation(len(values))]
            bs.append(np.full(len(ranks), k))
            pos.append(flat[ranks])
            labels.append(values[ranks])
            if dense:
                lab_map[k, flat] = values
        if not bs or not sum(len(p) for p in pos):
            continue
        feats = as_tensor(X[sl], torch.float32)
        hw = tuple(feats.shape[-2:])
        p = torch.from_numpy(np.concatenate(pos))
        b = torch.from_numpy(np.concatenate(bs))
        keys, weights = _neighbours(b, p // size[1], p % size[1], hw, size)
        if dense:  # every cell of the images with labelled pixels, in grid order
            used = np.flatnonzero(counts[sl] > 0)
            feats = feats[torch.from_numpy(used)]
            local = torch.from_numpy(np.searchsorted(used, b.numpy()))
            keys = keys - (b * (hw[0] * hw[1]))[:, None] + (local * (hw[0] * hw[1]))[:, None]
            batch_cells = feats.permute(0, 2, 3, 1).reshape(-1, c)
            inverse = keys
            maps.append(lab_map[used].reshape(len(used), *size))
            a1, a2 = _dense_moments(feats, torch.from_numpy(maps[-1] != ignore_index), size)
            kept += len(used)
        else:
            unique, inverse = torch.unique(keys, return_inverse=True)
            batch_cells = feats.permute(0, 2, 3, 1).reshape(-1, c)[unique]
            pix = (batch_cells[inverse] * weights[:, :, None]).sum(1).double()
            a1, a2 = pix.sum(0).numpy(), (pix * pix).sum(0).numpy()
        s1 += a1
        s2 += a2
        cells.append(batch_cells.numpy())
        idxs.append(inverse.numpy() + m)
        ws.append(weights.numpy())
        m += len(batch_cells)
        ys.append(np.concatenate(labels).astype(np.int64))
        imgs.append(b.numpy() + sl.start)
        if len(ys) % TRIM_EVERY == 0:  # kept: small; the batches' temporaries must not pile up
            release_freed_memory()
    k = int(sum(len(v) for v in ys))
    mean = s1 / max(k, 1)
    var = np.maximum(s2 / max(k, 1) - mean * mean, 0.0)

    def cat(parts, shape, dtype):
        return np.concatenate(parts) if parts else np.zeros(shape, dtype)

    grid = (kept, *hw) if dense and kept else None
    return PixelSample(cat(cells, (0, c), np.float32), cat(idxs, (0, 4), np.int64),
                       cat(ws, (0, 4), np.float32), cat(ys, (0,), np.int64),
                       cat(imgs, (0,), np.int64), mean, var, total, max_label, size, grid,
                       np.concatenate(maps) if grid else None)
