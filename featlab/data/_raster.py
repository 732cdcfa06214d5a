"""Vectorised rasterisers behind the ``shapes`` data set: signed distances and textures.

Every shape is a *signed distance* ``d`` on a pixel grid, in pixels, positive inside: the hard
mask is ``d > 0`` (a pixel belongs to the shape when its centre does) and the image may use the
soft coverage ``clip(d + 0.5, 0, 1)`` for a one-pixel anti-aliased edge. Convex pieces are
intersections of half-planes (``min`` of distances), unions are ``max``; no per-pixel Python.

Textures are scalar fields ``t`` in [0, 1] that mix two colours, computed in *image* coordinates
(fractions of the image side), so an object's texture does not follow its class, position or
rotation. Every random number is drawn by the caller (see :mod:`featlab.data.shapes`); these
functions are pure.
"""

from __future__ import annotations

import math

import numpy as np

# name of each shape class, in class-index order (index 0 is the background)
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "hexagon", "arrow")
# shapes whose look survives a change of aspect ratio (a stretched square is a rectangle, a
# stretched circle or ring an ellipse: those keep aspect 1 so that the class stays unambiguous)
STRETCHABLE = frozenset({"triangle", "star", "cross", "hexagon", "arrow"})
TEXTURES = ("flat", "gradient", "stripes", "checker", "blobs")

_SQRT3 = math.sqrt(3.0)


def _halfplanes(u: np.ndarray, v: np.ndarray, normals: np.ndarray, offset: float) -> np.ndarray:
    """Distance inside the convex polygon ``{p : n_k . p <= offset for all k}`` (unit normals)."""
    d = offset - (u * normals[0, 0] + v * normals[0, 1])
    for nx, ny in normals[1:]:
        np.minimum(d, offset - (u * nx + v * ny), out=d)
    return d


def _regular_normals(n: int) -> np.ndarray:
    angles = np.arange(n) * (2 * math.pi / n)
    return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


_TRIANGLE_NORMALS = _regular_normals(3)
_HEXAGON_NORMALS = _regular_normals(6)


def signed_distance(shape: str, u: np.ndarray, v: np.ndarray, radius: float,
                    p1: float, p2: float) -> np.ndarray:
    """Signed distance (pixels, > 0 inside) of ``shape`` centred at the origin of ``(u, v)``.

    ``radius`` is the circumscribed radius in pixels; ``p1`` and ``p2`` in [0, 1) pick the
    shape's free proportions (star depth, ring width, arm width, arrow head) from fixed ranges.
    """
    r = radius
    if shape == "circle":
        return r - np.sqrt(u * u + v * v)
    if shape == "ring":
        rho = np.sqrt(u * u + v * v)
        inner = r * (0.45 + 0.25 * p1)
        return np.minimum(r - rho, rho - inner)
    if shape == "square":
        return r / math.sqrt(2.0) - np.maximum(np.abs(u), np.abs(v))
    if shape == "triangle":  # equilateral: apothem = R / 2
        return _halfplanes(u, v, _TRIANGLE_NORMALS, 0.5 * r)
    if shape == "hexagon":  # apothem = R cos(30 deg)
        return _halfplanes(u, v, _HEXAGON_NORMALS, 0.5 * _SQRT3 * r)
    if shape == "star":
        return _star(u, v, 5, r, r * (0.38 + 0.14 * p1))
    if shape == "cross":
        # arms of half-width b = w L reach the circumscribed circle at their corners (L, b)
        w = 0.22 + 0.16 * p1
        length = r / math.sqrt(1.0 + w * w)
        au, av = np.abs(u), np.abs(v)
        width = w * length
        return np.maximum(np.minimum(length - au, width - av), np.minimum(width - au, length - av))
    if shape == "arrow":
        return _arrow(u, v, r, p1, p2)
    raise AssertionError(f"unknown shape {shape!r}")  # internal: callers pass SHAPES only


def _star(u: np.ndarray, v: np.ndarray, n: int, outer: float, inner: float) -> np.ndarray:
    """n-pointed star: fold the angle into one half-sector, then one edge from tip to notch."""
    sector = 2 * math.pi / n
    a = np.arctan2(v, u) * np.float32(1.0 / sector) + np.float32(0.5)
    a -= np.floor(a)  # np.mod is slow on floats
    a = np.abs(a - np.float32(0.5)) * np.float32(sector)
    rho = np.sqrt(u * u + v * v)
    px, py = rho * np.cos(a), rho * np.sin(a)
    ex = inner * math.cos(0.5 * sector) - outer  # edge from the tip (outer, 0) to the notch
    ey = inner * math.sin(0.5 * sector)
    norm = math.hypot(ex, ey)
    return ((px - outer) * (-ey) + py * ex) / norm


def _arrow(u: np.ndarray, v: np.ndarray, r: float, p1: float, p2: float) -> np.ndarray:
    """Arrow along +u: a shaft and a triangular head, scaled so its farthest point is at ``r``."""
    shaft, head_len, head_w = 0.16 + 0.1 * p1, 0.7 + 0.3 * p2, 0.5 + 0.2 * p1  # units of L
    # farthest points from the centre: the tip (L), the tail corners, the head's base corners
    scale = max(1.0, math.hypot(1.0, shaft), math.hypot(1.0 - head_len, head_w))
    length = r / scale
    ws, hl, hw = shaft * length, head_len * length, head_w * length
    base = length - hl
    av = np.abs(v)
    body = np.minimum(np.minimum(ws - av, u + length), base - u)
    head = np.minimum(u - base, (hw * (length - u) - hl * av) / math.hypot(hw, hl))
    return np.maximum(body, head)


def _wave(y: np.ndarray, x: np.ndarray, ky: float, kx: float, phase: float) -> np.ndarray:
    """``sin(kx x + ky y + phase)`` on the grid, separably: four 1-D sines and two outer products
    instead of one 2-D sine (several times faster)."""
    ax = x * np.float32(kx) + np.float32(phase)
    ay = y * np.float32(ky)
    return np.sin(ax) * np.cos(ay) + np.cos(ax) * np.sin(ay)


def scalar_field(kind: str, params: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray | None:
    """Texture field in [0, 1] on the grid ``y`` (h, 1) x ``x`` (1, w) in image-side units.

    ``params`` holds uniform [0, 1) numbers drawn by the caller; None means a flat colour.
    """
    if kind == "flat":
        return None
    angle = 2 * math.pi * params[0]
    ca, sa = math.cos(angle), math.sin(angle)
    if kind == "gradient":  # centred on (params[2], params[3]) so its mean over a region is ~0.5
        slope = 1.0 + 4.0 * params[1]
        t = (x - np.float32(params[3])) * np.float32(ca * slope) \
            + (y - np.float32(params[2])) * np.float32(sa * slope)
        t += np.float32(0.5)
        return np.minimum(np.maximum(t, 0.0, out=t), 1.0, out=t)
    freq = 3.0 + 13.0 * params[1]  # 3-16 cycles per image side
    if kind == "stripes":
        k = 2 * math.pi * freq
        s = _wave(y, x, sa * k, ca * k, 2 * math.pi * params[2])
        if params[3] < 0.5:  # hard stripes
            return (s > 0).astype(np.float32)
        s *= np.float32(0.5)
        s += np.float32(0.5)
        return s
    if kind == "checker":
        a = np.floor(x * np.float32(ca * freq) + y * np.float32(sa * freq) + np.float32(params[2]))
        b = np.floor(y * np.float32(ca * freq) - x * np.float32(sa * freq) + np.float32(params[3]))
        a += b
        return (a.astype(np.int32) & 1).astype(np.float32)  # parity, also for negative cells
    if kind == "blobs":  # sum of three plane waves: smooth, irregular patches
        t = None
        for j in range(3):
            aj = 2 * math.pi * params[2 + 3 * j]
            fj = 2 * math.pi * (1.0 + 5.0 * params[3 + 3 * j])
            phase = 2 * math.pi * params[4 + 3 * j]
            wave = _wave(y, x, math.sin(aj) * fj, math.cos(aj) * fj, phase)
            t = wave if t is None else np.add(t, wave, out=t)
        t *= np.float32(1.0 / 6.0)
        t += np.float32(0.5)
        return t
    raise AssertionError(f"unknown texture {kind!r}")


def paint(kind: str, params: np.ndarray, colours: np.ndarray, y: np.ndarray, x: np.ndarray,
          noise: np.ndarray | None) -> np.ndarray:
    """Planar RGB float32 texture ``(3, h, w)``: two colours mixed by the field, plus noise.

    Planar, because numpy broadcasts over a trailing axis of length 3 an order of magnitude
    slower than over three contiguous planes.
    """
    t = scalar_field(kind, params, y, x)
    h, w = y.shape[0], x.shape[1]
    out = np.empty((3, h, w), np.float32)
    for c in range(3):
        c0 = np.float32(colours[0, c])
        if t is None:
            out[c] = c0
        else:
            np.multiply(t, np.float32(colours[1, c] - c0), out=out[c])
            out[c] += c0
    if noise is not None:
        out += noise
    return out
