"""``folder``: any data set laid out as images, single-channel masks and a class list.

Layout::

    ROOT/images/<stem>.{jpg,jpeg,png}     (sub-folders allowed: the id is the relative stem)
    ROOT/masks/<stem>.png                 single-channel class indices, 255 = ignore
    ROOT/classes.txt                      one class name per line; line k names class k
    ROOT/splits/<split>.txt               optional: the stems of each split, one per line

Without ``splits/`` every split holds every image (and a split other than ``"all"`` warns).
Mask values must be class indices or 255; anything else raises. In a two-class data set a mask
made only of 0 and 255 raises too, because that is how binary masks are usually saved, and
reading 255 as "ignore" would silently drop every foreground pixel; pass ``check_binary=False``
(``--option check_binary=false``) if such masks are meant. With more classes such a mask cannot
be a binary one and is read as it is: an image of background only, with ignored pixels.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from featlab.data._files import FileDataset, LabelMap, check_split, missing_files_error
from featlab.data.base import IGNORE_INDEX
from featlab.errors import DatasetFormatError
from featlab.errors import DatasetNotFoundError, FeatlabWarning

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_FIX = "pass root (--root) pointing at the folder that contains images/, masks/ and classes.txt."


def read_classes(path: Path) -> tuple[str, ...]:
    """Class names from ``classes.txt`` (blank lines skipped)."""
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names or len(names) > IGNORE_INDEX:
        raise DatasetFormatError(f"classes.txt must name 1..255 classes, one per line; got "
                                 f"{len(names)} in '{path}'. Fix: list one class name per line.")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DatasetFormatError(f"class names must be unique; got {duplicates} repeated in "
                                 f"'{path}'. Fix: give every class its own name.")
    return names


def _stem(name: str) -> str:
    """A listed stem, with any image suffix dropped and '/' as the separator."""
    name = name.strip().replace("\\", "/")
    return name.rsplit(".", 1)[0] if name.lower().endswith(IMAGE_SUFFIXES) else name


class FolderDataset(FileDataset):
    """A data set in the generic ``folder`` layout (see the module docstring).

    Args:
        split: a split listed in ``splits/`` or ``"all"`` (every image).
        root: the folder holding ``images/``, ``masks/`` and ``classes.txt``.
        size: side of the square crop after resizing the shorter side; None: native size.
        seed: recorded only (the data set has no randomness).
        length: keep the first ``length`` samples of the sorted order.
        check_binary: with two classes, raise on masks made only of 0 and 255 (see the module
            docstring).
    """

    name = "folder"

    def __init__(self, split: str = "all", *, root: str | os.PathLike | None = None,
                 size: int | None = None, seed: int = 0, length: int | None = None,
                 check_binary: bool = True) -> None:
        super().__init__(split, root=root, size=size, seed=seed, label="folder data set",
                         fix=_FIX)
        self.check_binary = bool(check_binary)
        root = self.root_path
        image_dir, mask_dir, class_file = root / "images", root / "masks", root / "classes.txt"
        if not (image_dir.is_dir() and mask_dir.is_dir() and class_file.is_file()):
            raise DatasetNotFoundError(
                f"folder data set not found under '{root}': expected {root}/{{images/*.jpg|png,"
                f"masks/*.png,classes.txt}}. Fix: {_FIX}")
        self.classes = read_classes(class_file)
        labels = LabelMap.identity(len(self.classes))

        images: dict[str, Path] = {}
        for path in sorted(image_dir.rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                stem = path.relative_to(image_dir).with_suffix("").as_posix()
                if stem in images:
                    raise DatasetFormatError(
                        f"image stems must be unique; got '{images[stem].name}' and "
                        f"'{path.name}' for {stem!r} in '{image_dir}'. Fix: keep one of them.")
                images[stem] = path
        if not images:
            raise DatasetNotFoundError(f"folder data set images not found under '{image_dir}': "
                                       f"expected *.jpg, *.jpeg or *.png. Fix: {_FIX}")

        stems = self._split_stems(root / "splits", split)
        if stems is None:
            stems = sorted(images)
        missing = [s for s in stems if s not in images]
        if missing:
            raise missing_files_error(f"images of split {split!r} (images/<stem>.jpg|png)",
                                      image_dir, missing, "fix splits/ or add the images.")
        masks = {s: mask_dir / f"{s}.png" for s in stems}
        missing = [s for s in stems if not masks[s].is_file()]
        if missing:
            raise missing_files_error("masks (masks/<stem>.png)", mask_dir, missing,
                                      "add a mask for every image (same stem, .png).")
        self._set_samples([(s, images[s], masks[s], labels) for s in stems], length)

    def _split_stems(self, split_dir: Path, split: str) -> list[str] | None:
        """Stems of ``split`` from ``splits/``, or None for every image."""
        if not split_dir.is_dir():
            if split != "all":
                warnings.warn(f"folder data set '{self.root_path}' has no splits/ folder, so split "
                              f"{split!r} holds every image (as does any other split).",
                              FeatlabWarning, stacklevel=4)
            return None
        available = sorted(p.stem for p in split_dir.glob("*.txt"))
        check_split("folder", split, [*available, "all"])
        if split == "all":
            return None
        lines = (split_dir / f"{split}.txt").read_text().splitlines()
        return sorted({_stem(line) for line in lines if line.strip()})

    def check_mask(self, mask: np.ndarray, path: Path) -> None:
        if not self.check_binary or len(self.classes) != 2:
            return
        present = np.bincount(mask.ravel(), minlength=256) > 0  # cheaper than np.unique
        if present.sum() == 2 and present[0] and present[IGNORE_INDEX]:
            raise DatasetFormatError(
                f"masks must hold class indices (255 = ignore); got only 0 and 255 in '{path}', "
                f"which looks like a binary mask whose foreground would be ignored. Fix: store "
                f"the foreground as class 1 (e.g. mask // 255), or pass check_binary=False "
                f"(--option check_binary=false) if 255 really marks ignored pixels.")

    def options(self) -> dict[str, Any]:
        return {**super().options(), "check_binary": self.check_binary}
