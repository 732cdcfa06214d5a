"""What the data sets read from disk share: file listing, label maps, image/mask reading, errors.

A :class:`FileDataset` holds, per sample, an id, an image path and a mask path with the
:class:`LabelMap` that turns the file's raw values into class indices (255 = ignore). Raw values
a layout does not define raise :class:`~featlab.data.base.DatasetFormatError` naming the file:
a wrong label never passes silently (field notes R-2.2).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from featlab.data.base import IGNORE_INDEX, SegmentationDataset
from featlab.errors import DatasetFormatError
from featlab.data.transforms import resize_and_center_crop
from featlab.errors import ConfigError, DatasetNotFoundError, UnknownNameError, did_you_mean

log = logging.getLogger("featlab")


class LabelMap:
    """Raw mask value -> class index, with the set of raw values the layout allows.

    Examples:
        >>> lm = LabelMap.identity(3)
        >>> lm.apply(np.array([[0, 2, 255]], np.uint8), "x.png").tolist()
        [[0, 2, 255]]
    """

    def __init__(self, mapping: Mapping[int, int], expected: str) -> None:
        self.lut = np.full(256, IGNORE_INDEX, np.uint8)
        self.valid = np.zeros(256, bool)
        for raw, cls in mapping.items():
            self.lut[raw] = cls
            self.valid[raw] = True
        self.expected = expected  # e.g. "class indices 0..20 or 255 (ignore)"

    @classmethod
    def identity(cls, num_classes: int) -> LabelMap:
        """Values are class indices ``0 .. num_classes - 1``; 255 is ignore."""
        mapping = {k: k for k in range(num_classes)}
        mapping[IGNORE_INDEX] = IGNORE_INDEX
        return cls(mapping, f"class indices 0..{num_classes - 1} or {IGNORE_INDEX} (ignore)")

    def apply(self, raw: np.ndarray, source: object) -> np.ndarray:
        """Map ``raw`` (uint8) to class indices; raise if it holds a value the layout lacks."""
        counts = np.bincount(raw.ravel(), minlength=256)
        bad = np.flatnonzero((counts > 0) & ~self.valid)
        if bad.size:
            shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
            raise DatasetFormatError(
                f"mask values must be {self.expected}; got {shown} in '{source}'. Fix: store "
                f"class indices in the mask (see the data set's documented layout)."
            )
        return np.take(self.lut, raw)


def read_image(path: Path) -> Image.Image:
    """An RGB ``PIL.Image`` (grayscale and RGBA files are converted)."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"image file must exist; '{path}' is missing. Fix: restore "
                                   f"it, or rebuild the data set object.") from e
    except (UnidentifiedImageError, OSError) as e:
        raise DatasetFormatError(f"image file must be a readable JPEG/PNG; '{path}' is not "
                                 f"({e}). Fix: re-extract or replace it.") from e


def read_label_png(path: Path) -> np.ndarray:
    """The raw values of a single-channel label PNG as uint8 ``[H, W]``.

    Palette ("P") PNGs give their palette *indices* -- never converted to colours or to
    grayscale, which would turn VOC's class 1 (dark red) into luminance 38.
    """
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode in ("P", "L", "1"):
                return np.array(im, dtype=np.uint8)
            if mode.startswith("I"):  # 16/32-bit grayscale: fine while values fit in uint8
                arr = np.array(im)
                if arr.size and (arr.min() < 0 or arr.max() > 255):
                    raise DatasetFormatError(
                        f"mask values must fit in 0..255; got {arr.min()}..{arr.max()} in "
                        f"'{path}'. Fix: store class indices in an 8-bit PNG.")
                return arr.astype(np.uint8)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"mask file must exist; '{path}' is missing. Fix: restore "
                                   f"it, or rebuild the data set object.") from e
    except UnidentifiedImageError as e:
        raise DatasetFormatError(f"mask file must be a readable PNG; '{path}' is not. Fix: "
                                 f"re-extract or replace it.") from e
    raise DatasetFormatError(
        f"mask must be a single-channel PNG of class indices (palette or grayscale); got a "
        f"{mode} image in '{path}'. Fix: convert colour-coded masks to class indices."
    )


def list_stems(folder: Path, suffixes: Iterable[str]) -> dict[str, Path]:
    """``{stem: path}`` of the files directly in ``folder`` whose suffix (any case) matches."""
    suffixes = tuple(s.lower() for s in suffixes)
    out: dict[str, Path] = {}
    with os.scandir(folder) as entries:
        for e in entries:
            name = e.name
            if name.lower().endswith(suffixes) and e.is_file():
                out[name.rsplit(".", 1)[0]] = Path(e.path)
    return out


def read_id_list(path: Path) -> list[str]:
    """Sample ids listed one per line (first token; a path or file name is cut to its stem)."""
    ids = []
    for line in path.read_text().splitlines():
        token = line.split("#", 1)[0].strip().split(maxsplit=1)
        if token:
            ids.append(Path(token[0]).stem if ("/" in token[0] or "." in token[0]) else token[0])
    return ids


def check_split(dataset: str, split: str, available: Iterable[str]) -> None:
    """Raise UnknownNameError listing the available splits."""
    available = list(available)
    if split not in available:
        raise UnknownNameError(f"{dataset} split must be one of {', '.join(available)}; got "
                               f"{split!r}.{did_you_mean(split, available)} Fix: pass one of "
                               f"these splits.")


def missing_files_error(what: str, where: Path, missing: list[str],
                        fix: str) -> DatasetNotFoundError:
    """One-line error naming how many files are missing and the first few."""
    shown = ", ".join(repr(m) for m in missing[:3]) + (", ..." if len(missing) > 3 else "")
    return DatasetNotFoundError(f"{what} must exist under '{where}'; {len(missing)} missing: "
                                f"{shown}. Fix: {fix}")


class FileDataset(SegmentationDataset):
    """A data set read from image and mask files (see the module docstring)."""

    def __init__(self, split: str, *, root: str | os.PathLike | None, size: int | None,
                 seed: int, label: str, fix: str) -> None:
        if root is None:
            raise DatasetNotFoundError(f"{label} is read from a local folder, so `root` must name "
                                       f"it; got root=None. Fix: {fix}")
        root_path = Path(root).expanduser().resolve()
        super().__init__(split, root=str(root_path), size=size, seed=seed)
        self.root_path = root_path
        self.length: int | None = None
        self._images: list[Path] = []
        self._masks: list[tuple[Path, LabelMap]] = []

    def _set_samples(self, samples: Iterable[tuple[str, Path, Path, LabelMap]],
                     length: int | None) -> None:
        """Store samples in sorted id order, keeping the first ``length`` if given."""
        ordered = sorted(samples, key=lambda s: s[0])
        if length is not None:
            if isinstance(length, bool) or not isinstance(length, (int, np.integer)) \
                    or not 0 <= length <= len(ordered):
                raise ConfigError(f"`length` must be None or an int in 0..{len(ordered)} (the "
                                  f"samples of {self.name} {self.split}); got {length!r}. "
                                  f"Fix: pass a smaller length or None.")
            ordered = ordered[:int(length)]
            self.length = int(length)
        log.debug("%s %s: %d samples under %s", self.name, self.split, len(ordered),
                  self.root_path)
        if self.size is not None:  # a label resize is never silent
            log.info("%s %s: images and masks resized to a %d px shorter side and centre-cropped "
                     "to %dx%d (masks by nearest neighbour): metrics score these labels, not the "
                     "files' own (in Python, size=None keeps them)", self.name, self.split,
                     self.size, self.size, self.size)
        self.ids = [s[0] for s in ordered]
        self._images = [s[1] for s in ordered]
        self._masks = [(s[2], s[3]) for s in ordered]

    def read_raw_label(self, path: Path) -> np.ndarray:
        """Raw label values of one mask file (PNG; data sets override for other formats)."""
        return read_label_png(path)

    def check_mask(self, mask: np.ndarray, path: Path) -> None:
        """Data-set-specific checks on a mapped mask (none by default)."""

    def paths(self, i: int) -> tuple[Path, Path]:
        """Image and mask file of sample ``i``."""
        i = self._check_index(i)
        return self._images[i], self._masks[i][0]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        image = read_image(self._images[i])
        mask_path, label_map = self._masks[i]
        mask = label_map.apply(self.read_raw_label(mask_path), mask_path)
        self.check_mask(mask, mask_path)
        if mask.shape != (image.height, image.width):
            raise DatasetFormatError(
                f"image and mask must have the same size; got {image.height}x{image.width} for "
                f"'{self._images[i]}' and {mask.shape[0]}x{mask.shape[1]} for '{mask_path}'. "
                f"Fix: re-extract the pair.")
        if self.size is None:
            return np.array(image), mask  # a writable copy, for torch.from_numpy
        return resize_and_center_crop(image, mask, self.size)

    def options(self) -> dict[str, Any]:
        return {"length": self.length}
