"""Turn stored feature maps ``[b, C, h, w]`` into sample-by-feature matrices (R-3.4, R-10.1).

Three spatial policies, always explicit and recorded with the result:

* ``"gap"``: one sample per image, the feature map averaged over its positions (``[b, C]``);
* ``"flatten"``: one sample per image, the whole map as a vector (``[b, C*h*w]``);
* ``"pixels"``: one sample per (image, position): ``positions`` input pixels per image are
  drawn with a seed, and each point contributes the feature vector of the unit *centred*
  nearest to that input pixel, so the rows of points with different strides describe the same
  places of the same images. The unit centre is the centre of its theoretical receptive field
  (``u * rf_stride - rf_padding + (rf_size - 1) / 2``) when the point's field is exact and its
  map is stored at full size, else the centre of the cell's footprint
  (``(u + 1/2) * H / h - 1/2``, e.g. for maps area-pooled by ``max_size``).
"""

from __future__ import annotations

import math

import numpy as np

from featlab.errors import ConfigError
from featlab.points import SkipPoint

__all__ = ["SPATIAL", "sample_positions", "unit_index", "represent"]

SPATIAL = ("gap", "flatten", "pixels")


def sample_positions(num_images: int, input_size: tuple[int, int], positions: int, seed: int
                     ) -> np.ndarray:
    """``[num_images, positions, 2]`` int64 input pixels (row, column), uniform, seeded."""
    if not isinstance(positions, int) or positions < 1:
        raise ConfigError(f"positions must be an int >= 1 (pixels sampled per image); got "
                          f"{positions!r}. Fix: e.g. positions=16.")
    rng = np.random.default_rng(seed)
    h, w = input_size
    return np.stack([rng.integers(0, h, (num_images, positions)),
                     rng.integers(0, w, (num_images, positions))], -1).astype(np.int64)


def unit_index(coords: np.ndarray, axis: int, point: SkipPoint, stored: tuple[int, int],
               input_size: tuple[int, int]) -> tuple[np.ndarray, str]:
    """Index of the unit whose centre is nearest to input pixel ``coords`` along ``axis``
    (0 = rows, 1 = columns), clipped to the map, and the alignment used."""
    n_units, n_in = stored[axis], input_size[axis]
    exact = (point.rf_status.startswith("exact") and point.rf_size is not None
             and point.rf_stride is not None and tuple(stored) == tuple(point.size))
    if exact:
        centre0 = -point.rf_padding + (point.rf_size - 1) / 2
        u = np.floor((coords - centre0) / point.rf_stride + 0.5)
        how = "rf_centre"
    else:
        u = np.floor((coords + 0.5) * n_units / n_in)
        how = "cell_centre"
    return np.clip(u, 0, n_units - 1).astype(np.int64), how


def represent(feats: np.ndarray, spatial: str, *, point: SkipPoint | None = None,
              coords: np.ndarray | None = None, input_size: tuple[int, int] | None = None
              ) -> tuple[np.ndarray, str | None]:
    """The float64 ``[samples, features]`` matrix of one batch of one point.

    Args:
        feats: ``[b, C, h, w]`` stored features (any float dtype).
        spatial: one of :data:`SPATIAL`.
        point: the point's record (``"pixels"`` only).
        coords: ``[b, P, 2]`` input pixels of these images (``"pixels"`` only).
        input_size: the network input (H, W) (``"pixels"`` only).

    Returns:
        The matrix and, for ``"pixels"``, the alignment used (else None).

    Examples:
        >>> x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
        >>> represent(x, "gap")[0].tolist(), represent(x, "flatten")[0].shape
        ([[7.5]], (1, 16))
    """
    if feats.ndim != 4:
        raise ConfigError(f"features must be [b, C, h, w]; got shape {feats.shape}.")
    b, c, h, w = feats.shape
    if spatial == "gap":
        return feats.mean((2, 3), dtype=np.float64), None  # no float64 copy of the maps
    if spatial == "flatten":
        return feats.reshape(b, -1).astype(np.float64), None
    if spatial != "pixels":
        raise ConfigError(f"spatial must be one of {SPATIAL}; got {spatial!r}. Fix: 'gap' "
                          "(pool each map), 'flatten' (whole map) or 'pixels' (positions).")
    uy, how = unit_index(coords[..., 0], 0, point, (h, w), input_size)
    ux, _ = unit_index(coords[..., 1], 1, point, (h, w), input_size)
    picked = feats[np.arange(b)[:, None], :, uy, ux]        # [b, P, C]
    return picked.reshape(-1, c).astype(np.float64), how


def rescale_positions(coords: np.ndarray, src: tuple[int, int], dst: tuple[int, int]
                      ) -> np.ndarray:
    """Input pixels of one input size mapped to another (same relative place)."""
    if tuple(src) == tuple(dst):
        return coords
    out = coords.copy()
    for axis in (0, 1):
        out[..., axis] = np.minimum(np.floor((coords[..., axis] + 0.5) * dst[axis] / src[axis]),
                                    dst[axis] - 1)
    return out


def batch_plan(n: int, batch_size: int, seed: int) -> list[np.ndarray]:
    """Fixed, seeded batch composition for minibatch CKA: a permutation of the n samples cut
    into ``ceil(n / batch_size)`` nearly equal batches (each sorted, so reads are contiguous)."""
    if not isinstance(batch_size, int) or batch_size < 4:
        raise ConfigError(f"batch_size must be an int >= 4 for minibatch CKA (the unbiased HSIC "
                          f"divides by (b-2)(b-3)); got {batch_size!r}. Fix: e.g. 256.")
    if n < 4:
        raise ConfigError(f"minibatch CKA needs at least 4 samples; got {n}.")
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(perm, math.ceil(n / batch_size))
    small = min(len(p) for p in parts)
    if small < 4:
        raise ConfigError(f"every minibatch must hold >= 4 samples; {n} samples in batches of "
                          f"{batch_size} leave one of {small}. Fix: choose another batch_size.")
    return [np.sort(p) for p in parts]
