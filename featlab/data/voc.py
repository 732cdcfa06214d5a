"""PASCAL VOC 2012 segmentation, optionally with the SBD-augmented training set (``train_aug``).

Layout (``root`` may be the folder holding ``VOCdevkit``, ``VOCdevkit`` itself or ``VOC2012``)::

    ROOT/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    ROOT/VOCdevkit/VOC2012/SegmentationClass/<id>.png    palette PNG: index = class, 255 = border
    ROOT/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,trainval}.txt

``train_aug`` (10582 images in the usual setup) is read from either

* ``VOC2012/SegmentationClassAug/<id>.png`` + ``VOC2012/ImageSets/Segmentation/train_aug.txt``
  (the layout DeepLab popularised), or
* the original SBD release ``benchmark_RELEASE/dataset/{cls/<id>.mat, train.txt, val.txt}``
  (found under ``sbd_root``, ROOT, or the folder holding VOCdevkit): VOC train + SBD train + SBD
  val, with VOC's own mask where VOC has one and SBD's ``GTcls.Segmentation`` otherwise.

Both exclude every VOC ``val`` image, so that ``train_aug`` never overlaps the evaluation split.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from featlab.data._files import (FileDataset, LabelMap, check_split, list_stems,
                                 missing_files_error, read_id_list, read_label_png)
from featlab.errors import DatasetFormatError
from featlab.errors import DatasetNotFoundError

CLASSES: tuple[str, ...] = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
    "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)
SPLITS = ("train", "val", "trainval", "train_aug")
_FIX = "pass root (--root) pointing at the folder that contains VOCdevkit."
_SBD_FIX = ("put VOC2012/SegmentationClassAug/*.png with ImageSets/Segmentation/train_aug.txt "
            "in place, or pass sbd_root pointing at benchmark_RELEASE.")


def find_voc(root: Path) -> Path:
    """The ``VOC2012`` folder under ``root`` (which may also be VOCdevkit or VOC2012 itself)."""
    for base in (root / "VOCdevkit" / "VOC2012", root / "VOC2012", root):
        if (base / "JPEGImages").is_dir():
            needed = [base / "SegmentationClass", base / "ImageSets" / "Segmentation"]
            if all(p.is_dir() for p in needed):
                return base
    raise DatasetNotFoundError(
        f"VOC 2012 not found under '{root}': expected {root}/VOCdevkit/VOC2012/{{JPEGImages,"
        f"SegmentationClass,ImageSets/Segmentation/val.txt}}. Fix: {_FIX}")


def find_sbd(candidates: list[Path]) -> Path | None:
    """The SBD ``benchmark_RELEASE/dataset`` folder among ``candidates`` (or their children)."""
    for c in candidates:
        for d in (c, c / "dataset", c / "benchmark_RELEASE" / "dataset"):
            if (d / "cls").is_dir() and (d / "train.txt").is_file() and (d / "val.txt").is_file():
                return d
    return None


def read_sbd_mat(path: Path) -> np.ndarray:
    """Class indices of an SBD ``cls/<id>.mat`` file (``GTcls.Segmentation``)."""
    import scipy.io  # only SBD needs scipy.io; keep `import featlab.data` light

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"SBD mask file must exist; '{path}' is missing. Fix: "
                                   f"re-extract benchmark_RELEASE.") from e
    except (KeyError, AttributeError, ValueError) as e:
        raise DatasetFormatError(f"SBD mask must be a .mat file with GTcls.Segmentation; '{path}' "
                                 f"is not ({e!r}). Fix: re-extract benchmark_RELEASE.") from e
    if seg.ndim != 2 or seg.size == 0 or seg.min() < 0 or seg.max() > 255:
        raise DatasetFormatError(f"SBD GTcls.Segmentation must be a 2-D array of class indices; "
                                 f"got shape {seg.shape} in '{path}'. Fix: re-extract it.")
    return seg.astype(np.uint8)


class VOCDataset(FileDataset):
    """PASCAL VOC 2012 segmentation (21 classes, 255 = object borders and difficult regions).

    Args:
        split: ``"train"``, ``"val"``, ``"trainval"`` or ``"train_aug"`` (SBD-augmented train).
        root: folder holding VOCdevkit (or VOCdevkit, or VOC2012).
        size: side of the square crop after resizing the shorter side; None: native size.
        seed: recorded only (the data set has no randomness).
        length: keep the first ``length`` samples of the sorted order.
        sbd: with ``split="train"``, read ``train_aug`` instead.
        sbd_root: folder of the SBD release (``benchmark_RELEASE`` or its ``dataset``).
    """

    name = "voc"

    def __init__(self, split: str = "train", *, root: str | os.PathLike | None = None,
                 size: int | None = None, seed: int = 0, length: int | None = None,
                 sbd: bool = False, sbd_root: str | os.PathLike | None = None) -> None:
        if sbd and split == "train":
            split = "train_aug"
        check_split("voc", split, SPLITS)
        super().__init__(split, root=root, size=size, seed=seed, label="VOC 2012", fix=_FIX)
        self.sbd = bool(sbd)
        self.sbd_root = None if sbd_root is None else str(Path(sbd_root).expanduser().resolve())
        self.classes = CLASSES
        self._labels = LabelMap.identity(len(CLASSES))
        self.base = find_voc(self.root_path)
        self._jpgs = list_stems(self.base / "JPEGImages", [".jpg"])
        self._pngs = list_stems(self.base / "SegmentationClass", [".png"])
        if split == "train_aug":
            samples = self._train_aug()
        else:
            ids = self._split_ids(split)
            missing = [i for i in ids if i not in self._jpgs or i not in self._pngs]
            if missing:
                raise missing_files_error(
                    f"VOC 2012 {split} images (JPEGImages/<id>.jpg) and masks "
                    f"(SegmentationClass/<id>.png)", self.base, missing,
                    "re-extract VOCtrainval_11-May-2012.tar.")
            samples = [(i, self._jpgs[i], self._pngs[i], self._labels) for i in ids]
        self._set_samples(samples, length)

    def _split_ids(self, split: str) -> list[str]:
        path = self.base / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not path.is_file():
            raise DatasetNotFoundError(
                f"VOC 2012 split file not found under '{self.base}': expected {path}. Fix: "
                f"re-extract VOCtrainval_11-May-2012.tar, or pick a split that exists.")
        return sorted(set(read_id_list(path)))

    def _train_aug(self) -> list[tuple[str, Path, Path, LabelMap]]:
        val = set(self._split_ids("val"))
        listing = self.base / "ImageSets" / "Segmentation" / "train_aug.txt"
        aug_dir = self.base / "SegmentationClassAug"
        if listing.is_file() and aug_dir.is_dir():
            ids = sorted(set(read_id_list(listing)) - val)
            masks = list_stems(aug_dir, [".png"])
            missing = [i for i in ids if i not in self._jpgs or i not in masks]
            if missing:
                raise missing_files_error("VOC train_aug images (JPEGImages/<id>.jpg) and masks "
                                          "(SegmentationClassAug/<id>.png)", self.base, missing,
                                          _SBD_FIX)
            return [(i, self._jpgs[i], masks[i], self._labels) for i in ids]

        candidates = [Path(self.sbd_root)] if self.sbd_root else []
        # ROOT, VOCdevkit, and the folder holding VOCdevkit
        candidates += [self.root_path, self.base.parent, self.base.parent.parent]
        sbd = find_sbd(candidates)
        if sbd is None:
            raise DatasetNotFoundError(
                f"VOC train_aug (SBD) not found under '{self.root_path}': expected "
                f"{self.base}/{{SegmentationClassAug/*.png,ImageSets/Segmentation/train_aug.txt}} "
                f"or benchmark_RELEASE/dataset/{{cls/*.mat,train.txt,val.txt}}. Fix: {_SBD_FIX}")
        ids = set(read_id_list(sbd / "train.txt")) | set(read_id_list(sbd / "val.txt"))
        ids |= set(self._split_ids("train"))
        ids = sorted(ids - val)
        mats = list_stems(sbd / "cls", [".mat"])
        sbd_jpgs = list_stems(sbd / "img", [".jpg"]) if (sbd / "img").is_dir() else {}
        samples, missing = [], []
        for i in ids:
            image = self._jpgs.get(i) or sbd_jpgs.get(i)
            mask = self._pngs.get(i) or mats.get(i)  # VOC's own (finer, with borders) first
            if image is None or mask is None:
                missing.append(i)
            else:
                samples.append((i, image, mask, self._labels))
        if missing:
            raise missing_files_error("VOC train_aug images (JPEGImages or SBD img) and masks "
                                      "(SegmentationClass or SBD cls/<id>.mat)", sbd, missing,
                                      "re-extract VOC 2012 and benchmark_RELEASE.")
        return samples

    def read_raw_label(self, path: Path) -> np.ndarray:
        if path.suffix.lower() == ".mat":
            return read_sbd_mat(path)
        return read_label_png(path)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "sbd": self.sbd, "sbd_root": self.sbd_root}
