"""Write miniature data sets in the standard on-disk layouts, for tests, docs and demos.

Each ``write_*`` function creates real JPEG/PNG (and SBD ``.mat``) files with Pillow/scipy in
the layout the matching loader reads, and returns the *raw* label arrays it wrote, keyed by
sample id, so that a test can compare what a loader returns with what is on disk.

Examples:
    >>> import tempfile
    >>> from featlab.data import load_dataset
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     raw = write_folder(tmp, classes=("bg", "cat"), stems=["a", "b"])
    ...     ds = load_dataset("folder", "all", root=tmp)
    ...     bool((ds[0]["mask"].numpy() == raw["a"]).all())
    True
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

Size = tuple[int, int]


def voc_palette() -> list[int]:
    """The 256-colour VOC palette (class 1 = (128, 0, 0), ..., 255 = (224, 224, 192)), flat."""
    palette = []
    for k in range(256):
        r = g = b = 0
        c = k
        for j in range(8):  # the bits of k, spread over the high bits of r, g, b
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def blocky_labels(rng: np.random.Generator, size: Size, values: Sequence[int],
                  block: int = 4) -> np.ndarray:
    """uint8 label map of ``block``-pixel squares, each a random choice from ``values``."""
    h, w = size
    grid = rng.choice(np.asarray(values, np.uint8), size=(-(-h // block), -(-w // block)))
    return np.kron(grid, np.ones((block, block), np.uint8))[:h, :w].astype(np.uint8)


def with_border(labels: np.ndarray, border: int = 255) -> np.ndarray:
    """VOC-style: pixels where the label changes (4-neighbourhood) become ``border``."""
    out = labels.copy()
    edge = np.zeros(labels.shape, bool)
    edge[:-1] |= labels[:-1] != labels[1:]
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    out[edge] = border
    return out


def _smooth_image(rng: np.random.Generator, size: Size) -> np.ndarray:
    """A smooth RGB image (JPEG keeps it within a few levels)."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.random() * x + rng.random() * y + c))
                    for c in (0.0, 0.3, 0.6)], axis=-1)
    return (img * 255).round().astype(np.uint8)


def _write_image(path: Path, rng: np.random.Generator, size: Size) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(_smooth_image(rng, size))
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


def _write_mask(path: Path, labels: np.ndarray, palette: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = np.ascontiguousarray(labels, np.uint8)
    if palette is None:
        image = Image.fromarray(labels)  # uint8 [H, W] -> mode "L"
    else:  # the values become palette indices, as in VOC's SegmentationClass
        image = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
        image.putpalette(palette)
    image.save(path)


def write_voc(root: str | os.PathLike, splits: Mapping[str, Sequence[str]], *,
              size: Size = (30, 40), seed: int = 0) -> dict[str, np.ndarray]:
    """``ROOT/VOCdevkit/VOC2012`` with JPEG images, palette masks (255 borders) and split files.

    ``trainval`` is written as the union of ``train`` and ``val``. Returns ``{id: mask}``.
    """
    base = Path(root) / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(seed)
    masks = {}
    lists = {k: list(v) for k, v in splits.items()}
    lists.setdefault("trainval", sorted(set(lists.get("train", [])) | set(lists.get("val", []))))
    for ids in lists.values():
        for i in ids:
            if i in masks:
                continue
            _write_image(base / "JPEGImages" / f"{i}.jpg", rng, size)
            masks[i] = with_border(blocky_labels(rng, size, range(21)))
            _write_mask(base / "SegmentationClass" / f"{i}.png", masks[i], voc_palette())
    seg = base / "ImageSets" / "Segmentation"
    seg.mkdir(parents=True, exist_ok=True)
    for split, ids in lists.items():
        (seg / f"{split}.txt").write_text("".join(f"{i}\n" for i in ids))
    return masks


def write_voc_aug(root: str | os.PathLike, ids: Sequence[str], *, size: Size = (30, 40),
                  seed: int = 1) -> dict[str, np.ndarray]:
    """The DeepLab ``SegmentationClassAug`` + ``train_aug.txt`` layout next to a VOC tree; ids
    without a JPEG get one. Returns ``{id: mask}``."""
    base = Path(root) / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(seed)
    masks = {}
    for i in ids:
        if not (base / "JPEGImages" / f"{i}.jpg").exists():
            _write_image(base / "JPEGImages" / f"{i}.jpg", rng, size)
        masks[i] = with_border(blocky_labels(rng, size, range(21)))
        _write_mask(base / "SegmentationClassAug" / f"{i}.png", masks[i])  # grayscale, like it
    lines = "".join(f"/JPEGImages/{i}.jpg /SegmentationClassAug/{i}.png\n" for i in ids)
    (base / "ImageSets" / "Segmentation" / "train_aug.txt").write_text(lines)
    return masks


def write_sbd(root: str | os.PathLike, train: Sequence[str], val: Sequence[str], *,
              size: Size = (30, 40), seed: int = 2) -> dict[str, np.ndarray]:
    """The SBD release ``ROOT/benchmark_RELEASE/dataset/{img,cls,train.txt,val.txt}``.
    Returns ``{id: GTcls.Segmentation}``."""
    import scipy.io

    base = Path(root) / "benchmark_RELEASE" / "dataset"
    (base / "cls").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    masks = {}
    for i in [*train, *val]:
        _write_image(base / "img" / f"{i}.jpg", rng, size)
        masks[i] = blocky_labels(rng, size, range(21))
        gt = {"Segmentation": masks[i], "Boundaries": np.zeros(0), "CategoriesPresent":
              np.unique(masks[i]).astype(np.uint8)}
        scipy.io.savemat(base / "cls" / f"{i}.mat", {"GTcls": gt})
    (base / "train.txt").write_text("".join(f"{i}\n" for i in train))
    (base / "val.txt").write_text("".join(f"{i}\n" for i in val))
    return masks


def write_cityscapes(root: str | os.PathLike, cities: Mapping[str, Mapping[str, int]], *,
                     size: Size = (16, 32), seed: int = 0, train_ids: bool = False,
                     values: Sequence[int] = (0, 1, 7, 8, 11, 14, 21, 23, 24, 26, 33)
                     ) -> dict[str, np.ndarray]:
    """``ROOT/{leftImg8bit,gtFine}/<split>/<city>/`` with ``n`` frames per ``{split: {city: n}}``.

    Writes ``*_gtFine_labelIds.png`` (raw label ids drawn from ``values``) and, with
    ``train_ids``, an all-zero ``*_gtFine_labelTrainIds.png`` beside it, so that a test can tell
    which of the two was read. Returns ``{"city/stem": labelIds}``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    out = {}
    for split, per_city in cities.items():
        for city, n in per_city.items():
            for k in range(n):
                stem = f"{city}_{k:06d}_{19 + k:06d}"
                _write_image(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                             rng, size)
                labels = blocky_labels(rng, size, values)
                gt = root / "gtFine" / split / city
                _write_mask(gt / f"{stem}_gtFine_labelIds.png", labels)
                if train_ids:
                    _write_mask(gt / f"{stem}_gtFine_labelTrainIds.png",
                                np.zeros(size, np.uint8))
                out[f"{city}/{stem}"] = labels
    return out


def write_ade20k(root: str | os.PathLike, counts: Mapping[str, int], *, size: Size = (24, 20),
                 seed: int = 0, values: Sequence[int] = (0, 1, 2, 75, 149, 150)
                 ) -> dict[str, np.ndarray]:
    """``ROOT/ADEChallengeData2016/{images,annotations}/<sub>/ADE_*`` with ``counts[sub]``
    samples per sub-folder (``training``, ``validation``). Returns ``{id: annotation}``."""
    base = Path(root) / "ADEChallengeData2016"
    rng = np.random.default_rng(seed)
    out = {}
    for sub, n in counts.items():
        tag = "train" if sub == "training" else "val"
        for k in range(n):
            stem = f"ADE_{tag}_{k + 1:08d}"
            _write_image(base / "images" / sub / f"{stem}.jpg", rng, size)
            out[stem] = blocky_labels(rng, size, values)
            _write_mask(base / "annotations" / sub / f"{stem}.png", out[stem])
    return out


def write_folder(root: str | os.PathLike, *, classes: Sequence[str], stems: Sequence[str],
                 splits: Mapping[str, Sequence[str]] | None = None, size: Size = (20, 28),
                 seed: int = 0, suffix: str = ".jpg") -> dict[str, np.ndarray]:
    """``ROOT/{images,masks,classes.txt[,splits]}`` (stems may contain '/'). Masks use every
    class and a 255 border. Returns ``{stem: mask}``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    out = {}
    for stem in stems:
        _write_image(root / "images" / f"{stem}{suffix}", rng, size)
        out[stem] = with_border(blocky_labels(rng, size, range(len(classes)), block=5))
        _write_mask(root / "masks" / f"{stem}.png", out[stem])
    for split, listed in (splits or {}).items():
        (root / "splits").mkdir(exist_ok=True)
        (root / "splits" / f"{split}.txt").write_text("".join(f"{s}\n" for s in listed))
    return out
