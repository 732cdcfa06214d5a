"""``shapes``: the embedded, procedurally generated segmentation data set.

Each image shows a few geometric objects (circle, square, triangle, star, cross, ring, hexagon,
arrow) of different sizes, rotations and aspects over a background, with occlusions drawn in
painter's order; the mask labels every pixel with the class of the visible object (0 =
background). Colours and textures (flat, gradient, stripes, checkerboard, blobs, pixel noise) of
the objects *and* of the background are drawn from one distribution that ignores the class, so
only the shape tells the classes apart: recognising it needs a large receptive field, while the
exact boundary needs fine resolution -- the trade-off skip connections are about. (An object
whose mean colour lies within 0.3 RGB of the background's gets new colours, for every class
alike, so that objects stay visible.)

A scene is a pure function of ``(seed, split, index)``: its random numbers come from
``np.random.default_rng([seed, split_code, index])`` (train 0, val 1, test 2), whatever the
worker, process or order. Geometry and textures are drawn in units of the image side, so one
scene renders at any size (only the per-pixel noise differs between sizes). Outputs are
bit-identical for one numpy build; float32 ``sin``/``arctan2`` may differ by an ulp between CPUs,
which can flip a rare edge pixel.

Examples:
    >>> import numpy as np
    >>> image, mask, objects = render_scene(np.random.default_rng(0), 64)
    >>> image.shape, image.dtype, mask.shape, len(objects) >= 2
    ((64, 64, 3), dtype('uint8'), (64, 64), True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from featlab.data import _raster
from featlab.data.base import SegmentationDataset, check_size
from featlab.errors import ConfigError, UnknownNameError, did_you_mean

CLASSES: tuple[str, ...] = ("background", *_raster.SHAPES)
SPLITS = {"train": 0, "val": 1, "test": 2}
DEFAULT_LENGTHS = {"train": 2000, "val": 500, "test": 500}
DEFAULT_SIZE = 128
GENERATOR = "shapes-v1"  # bump whenever a change alters the images of a (seed, split, index)

_MIN_CONTRAST = 0.3  # least RGB distance between an object's mean colour and the background's
_MAX_ASPECT = 1.3


@dataclass(frozen=True)
class ShapeObject:
    """One object of a rendered scene.

    Attributes:
        class_index: its class (1 .. 8; 0 is the background).
        class_name: ``CLASSES[class_index]``.
        centre: ``(y, x)`` in pixels; pixel ``(r, c)`` has its centre at ``(r + 0.5, c + 0.5)``.
        size: diameter of the circle around the shape, in pixels.
        angle: rotation in radians.
        aspect: length ratio of the shape's two axes (1 for circle, square and ring).
        area: pixels the shape covers on its own (before occlusion).
        visible_area: pixels of the mask that show it (after occlusion by later objects).
    """

    class_index: int
    class_name: str
    centre: tuple[float, float]
    size: float
    angle: float
    aspect: float
    area: int
    visible_area: int

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["centre"] = list(self.centre)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ShapeObject:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"ShapeObject keys must be fields of ShapeObject; got unknown "
                              f"{sorted(unknown)}. Fix: drop them.")
        return cls(**{**d, "centre": tuple(d["centre"])})


class _Uniforms:
    """Uniform [0, 1) numbers drawn from ``rng`` in one block and handed out in order (one
    generator call per object instead of a dozen: the draw dominated small images)."""

    def __init__(self, rng: np.random.Generator, n: int) -> None:
        self._values = rng.random(n).tolist()
        self._next = 0

    def take(self, k: int = 1) -> list[float]:
        out = self._values[self._next:self._next + k]
        self._next += k
        assert len(out) == k, "drew fewer uniforms than consumed"
        return out

    def one(self) -> float:
        return self.take(1)[0]


_TEXTURE_DRAWS = 21  # uniforms one texture consumes


def _draw_texture(u: _Uniforms) -> tuple[str, np.ndarray, np.ndarray, float]:
    """A texture, the same distribution for every class and for the background."""
    kind = _raster.TEXTURES[int(u.one() * len(_raster.TEXTURES))]
    params = np.array(u.take(12))
    colours = np.array(u.take(6), np.float32).reshape(2, 3)
    has_noise, level = u.take(2)
    noise = 0.04 + 0.21 * level if has_noise < 0.5 else 0.0
    return kind, params, colours, noise


def _mean_colour(kind: str, colours: np.ndarray) -> np.ndarray:
    return colours[0] if kind == "flat" else 0.5 * (colours[0] + colours[1])


def _describe(rng: np.random.Generator, num_objects: tuple[int, int],
              object_size: tuple[float, float]) -> tuple[tuple, list[dict]]:
    """Draw a scene in image-side units: background texture and objects (largest first).

    Every number that fixes the geometry and the textures is drawn here, before any per-pixel
    noise, so that a scene is the same at every image size.
    """
    background = _draw_texture(_Uniforms(rng, _TEXTURE_DRAWS))
    bg_mean = _mean_colour(background[0], background[2])
    n = int(rng.integers(num_objects[0], num_objects[1] + 1))
    log_lo, log_hi = math.log(object_size[0]), math.log(object_size[1])
    objects = []
    for _ in range(n):
        u = _Uniforms(rng, 8 + _TEXTURE_DRAWS)
        cls = 1 + int(u.one() * (len(CLASSES) - 1))
        shape = CLASSES[cls]
        diameter = math.exp(log_lo + (log_hi - log_lo) * u.one())
        aspect = _MAX_ASPECT ** (2.0 * u.one() - 1.0)  # log-uniform in [1/1.3, 1.3]
        if shape not in _raster.STRETCHABLE:
            aspect = 1.0
        stretch = math.sqrt(max(aspect, 1.0 / aspect))
        extent = 0.5 * diameter * stretch  # farthest shape point from the centre
        cy, cx = (extent + (1.0 - 2.0 * extent) * r for r in u.take(2))
        angle = 2.0 * math.pi * u.one()
        p1, p2 = u.take(2)
        kind, params, colours, noise = _draw_texture(u)
        for _ in range(8):  # redraw colours that would melt into the background
            if np.linalg.norm(_mean_colour(kind, colours) - bg_mean) >= _MIN_CONTRAST:
                break
            colours = rng.random((2, 3), np.float32)
        objects.append(dict(cls=cls, diameter=diameter, aspect=aspect, extent=extent, cy=cy, cx=cx,
                            angle=angle, p1=p1, p2=p2, texture=(kind, params, colours, noise)))
    # painter's order, largest first, so that small objects are rarely hidden entirely
    objects.sort(key=lambda o: -o["diameter"])
    return background, objects


def _check_options(num_objects: int | tuple[int, int],
                   object_size: tuple[float, float]) -> tuple[tuple[int, int], tuple[float, float]]:
    if isinstance(num_objects, (int, np.integer)) and not isinstance(num_objects, bool):
        num_objects = (int(num_objects), int(num_objects))
    try:
        lo, hi = (int(v) for v in num_objects)
    except (TypeError, ValueError):
        lo, hi = -1, -1
    if not 1 <= lo <= hi <= 250:
        raise ConfigError(f"`num_objects` must be an int or a (min, max) pair with 1 <= min <= "
                          f"max <= 250; got {num_objects!r}. Fix: pass e.g. num_objects=(2, 5).")
    try:
        s_lo, s_hi = (float(v) for v in object_size)
    except (TypeError, ValueError):
        s_lo, s_hi = -1.0, -1.0
    if not 0.02 <= s_lo <= s_hi <= 0.8:
        raise ConfigError(f"`object_size` must be a (min, max) pair of fractions of the image "
                          f"side with 0.02 <= min <= max <= 0.8; got {object_size!r}. Fix: pass "
                          f"e.g. object_size=(0.1, 0.6).")
    return (lo, hi), (s_lo, s_hi)


def render_scene(rng: np.random.Generator, size: int = DEFAULT_SIZE, *,
                 num_objects: int | tuple[int, int] = (2, 5),
                 object_size: tuple[float, float] = (0.1, 0.6),
                 antialias: bool = True) -> tuple[np.ndarray, np.ndarray, list[ShapeObject]]:
    """Draw and render one random scene.

    Args:
        rng: the source of every random choice (``np.random.default_rng(...)``).
        size: image side in pixels; the mask has the same size.
        num_objects: number of objects, or an inclusive ``(min, max)`` range.
        object_size: range of object diameters as fractions of the image side (log-uniform).
        antialias: soften object edges by one pixel in the image (the mask stays hard).

    Returns:
        ``(image, mask, objects)``: image uint8 ``[size, size, 3]`` (a view of a planar
        ``[3, size, size]`` buffer: ``np.ascontiguousarray`` it if you need C order); mask
        uint8 ``[size, size]`` with class indices (0 = background); one :class:`ShapeObject`
        per object in painter's order (the first is drawn first, i.e. lowest). A hidden object
        stays in the list with ``visible_area == 0``.

    Examples:
        >>> import numpy as np
        >>> _, mask, objs = render_scene(np.random.default_rng(1), 96, num_objects=1)
        >>> int((mask == objs[0].class_index).sum()) == objs[0].visible_area == objs[0].area
        True
    """
    num_objects, object_size = _check_options(num_objects, object_size)
    size = check_size(size)
    if size is None:
        raise ConfigError("`size` of render_scene must be a positive int; got None. Fix: pass "
                          "e.g. size=128.")
    background, objects = _describe(rng, num_objects, object_size)
    return _render(background, objects, rng, size, antialias)


def largest_visible_class(objects: list[ShapeObject]) -> int:
    """Class index of the object with the most visible pixels (0 if none is visible): a
    classification target for pretraining on ``shapes``.

    Examples:
        >>> import numpy as np
        >>> _, _, objs = render_scene(np.random.default_rng(1), 64, num_objects=1)
        >>> largest_visible_class(objs) == objs[0].class_index, largest_visible_class([])
        (True, 0)
    """
    best = max(objects, key=lambda o: o.visible_area, default=None)
    return 0 if best is None or best.visible_area == 0 else best.class_index


def _render(background: tuple, objects: list[dict], noise_rng: np.random.Generator, size: int,
            antialias: bool) -> tuple[np.ndarray, np.ndarray, list[ShapeObject]]:
    """Rasterise a drawn scene (``noise_rng`` draws the per-pixel noise); the image comes back
    as an ``[H, W, 3]`` view of a planar ``[3, H, W]`` buffer (numpy and torch take it as is)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size  # pixel centres, image-side units

    def texture(tex: tuple, rows: slice, cols: slice, centre: tuple[float, float]) -> np.ndarray:
        kind, params, colours, amp = tex
        if kind == "gradient":  # centre the gradient on the region it paints
            params = params.copy()
            params[2:4] = centre
        y, x = coords[rows, None], coords[None, cols]
        noise = None
        if amp > 0:
            noise = noise_rng.random((y.shape[0], x.shape[1]), dtype=np.float32)
            noise -= 0.5
            noise *= amp
        return _raster.paint(kind, params, colours, y, x, noise)

    full = slice(0, size)
    canvas = texture(background, full, full, (0.5, 0.5))  # planar [3, H, W]
    instance = np.zeros((size, size), np.uint8)
    drawn = []
    for k, o in enumerate(objects):
        cy, cx, radius = o["cy"] * size, o["cx"] * size, 0.5 * o["diameter"] * size
        reach = o["extent"] * size + 1.0
        r0, r1 = max(0, int(cy - reach)), min(size, int(math.ceil(cy + reach)))
        c0, c1 = max(0, int(cx - reach)), min(size, int(math.ceil(cx + reach)))
        yy = np.arange(r0, r1, dtype=np.float32)[:, None] + np.float32(0.5 - cy)
        xx = np.arange(c0, c1, dtype=np.float32)[None, :] + np.float32(0.5 - cx)
        ca, sa = math.cos(o["angle"]), math.sin(o["angle"])
        s = math.sqrt(o["aspect"])  # area-preserving stretch of the shape's frame
        u = xx * np.float32(ca / s) + yy * np.float32(sa / s)
        v = yy * np.float32(ca * s) - xx * np.float32(sa * s)
        d = _raster.signed_distance(CLASSES[o["cls"]], u, v, radius, o["p1"], o["p2"])
        inside = d > 0
        rows, cols = slice(r0, r1), slice(c0, c1)
        tex = texture(o["texture"], rows, cols, (o["cy"], o["cx"]))
        region = canvas[:, rows, cols]
        if antialias:
            alpha = d + np.float32(0.5)
            # clip with two ufuncs: np.clip costs more in call overhead than in work here
            np.minimum(np.maximum(alpha, 0.0, out=alpha), 1.0, out=alpha)
            tex -= region
            tex *= alpha
            region += tex
        else:
            np.copyto(region, tex, where=inside)
        instance[rows, cols][inside] = k + 1
        drawn.append((o, int(np.count_nonzero(inside)), (cy, cx), 2.0 * radius))

    canvas *= np.float32(255.0)
    canvas += np.float32(0.5)  # round, not truncate
    np.minimum(np.maximum(canvas, 0.0, out=canvas), 255.0, out=canvas)
    image = canvas.astype(np.uint8).transpose(1, 2, 0)
    lut = np.array([0] + [o["cls"] for o in objects], np.uint8)
    mask = np.take(lut, instance)
    visible = np.bincount(instance.ravel(), minlength=len(objects) + 1)
    records = [
        ShapeObject(class_index=o["cls"], class_name=CLASSES[o["cls"]], centre=centre,
                    size=diameter, angle=o["angle"], aspect=o["aspect"], area=area,
                    visible_area=int(visible[k + 1]))
        for k, (o, area, centre, diameter) in enumerate(drawn)
    ]
    return image, mask, records


class ShapesDataset(SegmentationDataset):
    """The embedded ``shapes`` data set (see the module docstring).

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (disjoint random streams).
        root: must be None (the data set is generated).
        size: image side in pixels (None: 128).
        seed: selects the whole collection; with split and index it fixes every image.
        length: number of samples (default train 2000, val 500, test 500).
        num_objects: objects per image, an int or an inclusive ``(min, max)`` range.
        object_size: range of object diameters as fractions of the image side.
        antialias: one-pixel soft object edges in the image (the mask stays hard).
        generator: the generator version the settings were made with; must be current.

    Examples:
        >>> ds = ShapesDataset("val", size=64, length=3)
        >>> s = ds[2]
        >>> s["image"].shape, s["mask"].shape, s["id"], len(ds.classes)
        (torch.Size([3, 64, 64]), torch.Size([64, 64]), 'val/s0/000002', 9)
    """

    name = "shapes"

    def __init__(self, split: str = "train", *, root: str | None = None, size: int | None = None,
                 seed: int = 0, length: int | None = None,
                 num_objects: int | tuple[int, int] = (2, 5),
                 object_size: tuple[float, float] = (0.1, 0.6), antialias: bool = True,
                 generator: str = GENERATOR) -> None:
        if split not in SPLITS:
            raise UnknownNameError(f"shapes split must be one of {', '.join(SPLITS)}; got "
                                   f"{split!r}.{did_you_mean(split, SPLITS)} Fix: pass one of "
                                   f"these splits.")
        if root is not None:
            raise ConfigError(f"shapes is generated and reads no files, so `root` must be None; "
                              f"got {root!r}. Fix: drop root (--root).")
        if generator != GENERATOR:
            raise ConfigError(f"shapes settings must come from generator {GENERATOR!r} (this "
                              f"featlab); got {generator!r}. Fix: use the featlab version that "
                              f"made them, or regenerate with the current one.")
        super().__init__(split, root=None, size=DEFAULT_SIZE if size is None else size, seed=seed)
        self.length = DEFAULT_LENGTHS[split] if length is None else length
        if isinstance(self.length, bool) or not isinstance(self.length, (int, np.integer)) \
                or self.length < 0:
            raise ConfigError(f"`length` must be a non-negative int or None; got {length!r}. "
                              f"Fix: pass e.g. length=100.")
        self.length = int(self.length)
        self.num_objects, self.object_size = _check_options(num_objects, object_size)
        self.antialias = bool(antialias)
        self.classes = CLASSES
        width = max(6, len(str(self.length - 1)))  # zero-padded: sorted ids == index order
        self.ids = [f"{split}/s{self.seed}/{i:0{width}d}" for i in range(self.length)]

    def rng(self, i: int) -> np.random.Generator:
        """The generator that draws scene ``i`` (the same in every process)."""
        return np.random.default_rng([self.seed, SPLITS[self.split], i])

    def scene(self, index: int) -> tuple[np.ndarray, np.ndarray, list[ShapeObject]]:
        """Sample ``index`` with its object records (see :func:`render_scene`)."""
        i = self._check_index(index)
        rng = self.rng(i)
        background, objects = _describe(rng, self.num_objects, self.object_size)
        return _render(background, objects, rng, self.size, self.antialias)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image, mask, _ = self.scene(i)
        return image, mask

    def options(self) -> dict[str, Any]:
        return {"length": self.length, "num_objects": list(self.num_objects),
                "object_size": list(self.object_size), "antialias": self.antialias,
                "generator": GENERATOR}
