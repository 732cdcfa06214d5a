"""Cityscapes (fine annotations), with the 19 evaluation classes ("train ids").

Layout (``root`` may also be a parent folder holding ``cityscapes/``)::

    ROOT/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
    ROOT/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
                                       (or ..._gtFine_labelTrainIds.png, used when present)

Sample ids are ``"<city>/<city>_<seq>_<frame>"``. ``labelIds`` are mapped to train ids with the
official table (``LABEL_ID_TO_TRAIN_ID``); every id the benchmark ignores becomes 255.
"""

from __future__ import annotations

import os
from pathlib import Path

from featlab.data._files import FileDataset, LabelMap, check_split, missing_files_error
from featlab.errors import DatasetNotFoundError

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
SPLITS = ("train", "val", "test")

# labelId -> trainId, from the `labels` table of cityscapesScripts
# (https://github.com/mcordts/cityscapesScripts, cityscapesscripts/helpers/labels.py):
# ids 0-6 (void), 9 parking, 10 rail track, 14 guard rail, 15 bridge, 16 tunnel, 18 polegroup,
# 29 caravan and 30 trailer have trainId 255 (ignored in evaluation).
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255,  # unlabeled .. ground
    7: 0, 8: 1,  # road, sidewalk
    9: 255, 10: 255,  # parking, rail track
    11: 2, 12: 3, 13: 4,  # building, wall, fence
    14: 255, 15: 255, 16: 255,  # guard rail, bridge, tunnel
    17: 5,  # pole
    18: 255,  # polegroup
    19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15,
    29: 255, 30: 255,  # caravan, trailer
    31: 16, 32: 17, 33: 18,  # train, motorcycle, bicycle
}
_IMAGE_SUFFIX = "_leftImg8bit.png"
_FIX = "pass root (--root) pointing at the folder that contains leftImg8bit and gtFine."

LABEL_IDS = LabelMap({**LABEL_ID_TO_TRAIN_ID, 255: 255},
                     "Cityscapes label ids 0..33 (gtFine_labelIds)")
TRAIN_IDS = LabelMap.identity(len(CLASSES))


def find_cityscapes(root: Path) -> Path:
    for base in (root, root / "cityscapes", root / "Cityscapes"):
        if (base / "leftImg8bit").is_dir() and (base / "gtFine").is_dir():
            return base
    raise DatasetNotFoundError(
        f"Cityscapes not found under '{root}': expected {root}/{{leftImg8bit,gtFine}}/<split>/"
        f"<city>/*_leftImg8bit.png, *_gtFine_labelIds.png. Fix: {_FIX}")


class CityscapesDataset(FileDataset):
    """Cityscapes fine annotations, 19 classes (train ids), 255 = ignore.

    Args:
        split: ``"train"``, ``"val"`` or ``"test"`` (test masks are all "ignore").
        root: folder holding ``leftImg8bit`` and ``gtFine``.
        size: side of the square crop after resizing the shorter side; None: native 1024x2048.
        seed: recorded only (the data set has no randomness).
        length: keep the first ``length`` samples of the sorted order.
    """

    name = "cityscapes"

    def __init__(self, split: str = "train", *, root: str | os.PathLike | None = None,
                 size: int | None = None, seed: int = 0, length: int | None = None) -> None:
        check_split("cityscapes", split, SPLITS)
        super().__init__(split, root=root, size=size, seed=seed, label="Cityscapes", fix=_FIX)
        self.classes = CLASSES
        base = find_cityscapes(self.root_path)
        image_dir, label_dir = base / "leftImg8bit" / split, base / "gtFine" / split
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DatasetNotFoundError(
                f"Cityscapes {split} split not found under '{base}': expected {image_dir} and "
                f"{label_dir}. Fix: extract leftImg8bit_trainvaltest.zip and "
                f"gtFine_trainvaltest.zip into {base}.")
        samples, missing = [], []
        for city in sorted(p.name for p in image_dir.iterdir() if p.is_dir()):
            labels = label_dir / city
            names = set(os.listdir(labels)) if labels.is_dir() else set()
            for image in sorted((image_dir / city).glob(f"*{_IMAGE_SUFFIX}")):
                stem = image.name[:-len(_IMAGE_SUFFIX)]
                train_ids = f"{stem}_gtFine_labelTrainIds.png"
                label_ids = f"{stem}_gtFine_labelIds.png"
                if train_ids in names:
                    samples.append((f"{city}/{stem}", image, labels / train_ids, TRAIN_IDS))
                elif label_ids in names:
                    samples.append((f"{city}/{stem}", image, labels / label_ids, LABEL_IDS))
                else:
                    missing.append(f"{city}/{stem}")
        if missing:
            raise missing_files_error("Cityscapes masks (gtFine/<split>/<city>/"
                                      "*_gtFine_labelIds.png)", label_dir, missing,
                                      "extract gtFine_trainvaltest.zip.")
        if not samples:
            raise DatasetNotFoundError(
                f"Cityscapes {split} images not found under '{image_dir}': expected "
                f"<city>/*{_IMAGE_SUFFIX}. Fix: extract leftImg8bit_trainvaltest.zip there.")
        self._set_samples(samples, length)
