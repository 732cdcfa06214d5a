"""The files of one head-training run: checkpoint, per-epoch log, ``run.json``.

A run folder holds ``checkpoint.pt`` (rewritten atomically after every epoch: head, optimizer,
scheduler, epoch, history; the backbone too when fine-tuning), ``log.csv`` and ``log.json`` (loss
and val metrics per epoch), ``run.json`` (settings, seed, versions, git hash, device, the caches'
identities, final metrics; ``"finished": true`` once training ended) and ``val_confusion.npz``
(per-image ``[N, C, C]`` confusion matrices of the final head on the val set, for bootstrap
confidence intervals over images; compressed, since an image shows few of the classes: an
ADE20K val run's 360 MB of matrices take about 1 MB).

Examples:
    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> write_log(d, [{"epoch": 1, "loss": 0.5, "val_miou": 0.25}])
    >>> (d / "log.csv").read_text().splitlines()
    ['epoch,loss,val_miou', '1,0.5,0.25']
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path

import torch

from featlab.errors import CheckpointError, ConfigError

log = logging.getLogger("featlab")

__all__ = ["CHECKPOINT", "RUN_JSON", "RUN_FILES", "check_folder", "refuse_foreign",
           "save_checkpoint", "load_checkpoint", "write_log", "write_json", "read_run",
           "write_confusions", "read_confusions"]

CHECKPOINT, RUN_JSON, LOG_CSV, LOG_JSON = "checkpoint.pt", "run.json", "log.csv", "log.json"
VAL_CONFUSION = "val_confusion.npz"
_OLD_CONFUSION = "val_confusion.npy"  # uncompressed, as runs before 2026-12-05 wrote it
# what a run writes (and an older run may hold)
RUN_FILES = (CHECKPOINT, RUN_JSON, LOG_CSV, LOG_JSON, VAL_CONFUSION, _OLD_CONFUSION)
FORMAT = 1  # bump when the checkpoint layout changes


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        write(tmp)
        os.replace(tmp, path)  # a kill leaves the old file or the new one, never a part
    finally:
        tmp.unlink(missing_ok=True)


def check_folder(folder: Path) -> None:
    """Raise :class:`ConfigError` unless ``folder`` can be created and written: a run checks this
    before training, not when its first checkpoint is due."""
    from featlab.cache.files import make_writable_folder

    try:
        make_writable_folder(folder)
    except OSError as err:
        raise ConfigError(f"the run folder must be a folder featlab can write; got {folder} "
                          f"({err.strerror or err}). Fix: choose another --out, or fix its "
                          "permissions.") from err


def refuse_foreign(folder: Path, names: tuple[str, ...], records: tuple[str, ...],
                   what: str) -> None:
    """Raise :class:`ConfigError` when ``folder`` holds a file of ``names`` (what featlab would
    write there) but none of ``records`` (its own record of a run): a file of the user's that
    would be overwritten."""
    folder = Path(folder)
    if any((folder / r).exists() for r in records):
        return
    there = [n for n in names if (folder / n).exists()]
    if there:
        raise ConfigError(f"the {what} folder must not hold files featlab did not write; "
                          f"{folder} has {', '.join(there)} but no {' or '.join(records)}. Fix: "
                          "choose another --out, or pass --force to replace them.")


def save_checkpoint(folder: Path, state: dict) -> None:
    """Write ``checkpoint.pt`` atomically (``state`` gets the format number)."""
    _atomic(Path(folder) / CHECKPOINT, lambda p: torch.save({"format": FORMAT, **state}, p))


def load_checkpoint(folder: Path) -> dict | None:
    """The checkpoint of ``folder``, or None when there is none."""
    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file means the same to the user
        raise CheckpointError(f"head checkpoint {path} must be readable to resume; it is not "
                              f"({err}). Fix: pass --force to start over.") from err
    if state.get("format") != FORMAT:
        raise CheckpointError(f"head checkpoint {path} must have format {FORMAT}; got "
                              f"{state.get('format')!r}. Fix: pass --force to start over.")
    return state


def write_json(path: Path, obj) -> None:
    _atomic(Path(path), lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def write_confusions(folder: Path, per_image) -> None:
    """``val_confusion.npz``: the per-image confusion matrices ``[N, C, C]``, compressed
    (``numpy.savez_compressed``, key ``per_image``), written atomically."""
    import numpy as np

    def write(p: Path) -> None:
        with open(p, "wb") as f:  # a file object: numpy adds no ".npz" to the name
            np.savez_compressed(f, per_image=per_image)

    _atomic(Path(folder) / VAL_CONFUSION, write)


def read_confusions(folder: Path):
    """The per-image confusion matrices of the run in ``folder`` (:func:`write_confusions`, or
    the ``val_confusion.npy`` of a run written before it)."""
    import numpy as np

    folder = Path(folder)
    if not (folder / VAL_CONFUSION).exists() and (folder / _OLD_CONFUSION).exists():
        return np.load(folder / _OLD_CONFUSION)
    with np.load(folder / VAL_CONFUSION) as f:
        return f["per_image"]


def write_log(folder: Path, history: list[dict]) -> None:
    """``log.csv`` and ``log.json``: one row per finished epoch."""
    folder = Path(folder)
    write_json(folder / LOG_JSON, history)
    if not history:
        return
    keys = list(history[0])

    def write(p: Path) -> None:
        with open(p, "w", newline="") as f:
            w = csv.DictWriter(f, keys, lineterminator="\n")
            w.writeheader()
            w.writerows(history)

    _atomic(folder / LOG_CSV, write)


def read_run(folder: Path) -> dict | None:
    """``run.json`` of ``folder`` as a dict, or None when absent."""
    path = Path(folder) / RUN_JSON
    return json.loads(path.read_text()) if path.is_file() else None
