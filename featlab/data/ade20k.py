"""ADE20K SceneParsing (the ADEChallengeData2016 release), 150 classes.

Layout (``root`` may also be ``ADEChallengeData2016`` itself)::

    ROOT/ADEChallengeData2016/images/{training,validation}/ADE_*.jpg
    ROOT/ADEChallengeData2016/annotations/{training,validation}/ADE_*.png

Annotation value 0 means "other" (no class) and becomes 255; value k (1..150) becomes class
k - 1, the convention of the benchmark's evaluation (mmsegmentation's ``reduce_zero_label``).
Splits ``train`` / ``val`` read ``training`` / ``validation``.
"""

from __future__ import annotations

import os
from pathlib import Path

from featlab.data._files import (FileDataset, LabelMap, check_split, list_stems,
                                 missing_files_error)
from featlab.errors import DatasetNotFoundError

# the short names of objectInfo150 (in mmsegmentation's ADE20KDataset order; index = class)
CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)
SPLITS = {"train": "training", "val": "validation"}
_FIX = "pass root (--root) pointing at the folder that contains ADEChallengeData2016."

LABELS = LabelMap({0: 255, **{k: k - 1 for k in range(1, len(CLASSES) + 1)}},
                  "ADE20K annotation values 0..150 (0 = other)")


def find_ade(root: Path) -> Path:
    for base in (root / "ADEChallengeData2016", root):
        if (base / "images").is_dir() and (base / "annotations").is_dir():
            return base
    raise DatasetNotFoundError(
        f"ADE20K not found under '{root}': expected {root}/ADEChallengeData2016/{{images,"
        f"annotations}}/{{training,validation}}/ADE_*.{{jpg,png}}. Fix: {_FIX}")


class ADE20KDataset(FileDataset):
    """ADE20K SceneParsing, 150 classes, 255 = "other" / ignore.

    Args:
        split: ``"train"`` (training) or ``"val"`` (validation).
        root: folder holding ``ADEChallengeData2016`` (or that folder itself).
        size: side of the square crop after resizing the shorter side; None: native size.
        seed: recorded only (the data set has no randomness).
        length: keep the first ``length`` samples of the sorted order.
    """

    name = "ade20k"

    def __init__(self, split: str = "train", *, root: str | os.PathLike | None = None,
                 size: int | None = None, seed: int = 0, length: int | None = None) -> None:
        check_split("ade20k", split, SPLITS)
        super().__init__(split, root=root, size=size, seed=seed, label="ADE20K", fix=_FIX)
        self.classes = CLASSES
        base = find_ade(self.root_path)
        sub = SPLITS[split]
        image_dir, label_dir = base / "images" / sub, base / "annotations" / sub
        if not image_dir.is_dir() or not label_dir.is_dir():
            raise DatasetNotFoundError(
                f"ADE20K {split} split not found under '{base}': expected {image_dir} and "
                f"{label_dir}. Fix: re-extract ADEChallengeData2016.zip.")
        images = list_stems(image_dir, [".jpg"])
        labels = list_stems(label_dir, [".png"])
        missing = sorted(set(images) - set(labels))
        if missing:
            raise missing_files_error(f"ADE20K annotations ({label_dir.name}/<id>.png)", label_dir,
                                      missing, "re-extract ADEChallengeData2016.zip.")
        if not images:
            raise DatasetNotFoundError(f"ADE20K {split} images not found under '{image_dir}': "
                                       f"expected ADE_*.jpg. Fix: re-extract "
                                       f"ADEChallengeData2016.zip.")
        self._set_samples([(s, images[s], labels[s], LABELS) for s in images], length)
