"""Shared plumbing of analysis results: cache identity, JSON/CSV files, dict checks."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from featlab.errors import ConfigError

__all__ = ["write_json_csv", "check_keys", "output_stem",
           "jsonable", "check_writable"]


def jsonable(value: Any) -> Any:
    """NaN / inf -> None, numpy scalars and arrays -> Python, recursively."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def check_keys(cls_name: str, d: dict, allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(d) - set(allowed))
    missing = sorted(set(allowed) - set(d))
    if unknown or missing:
        raise ConfigError(f"{cls_name} records must have exactly the keys {list(allowed)}; got "
                          f"unknown {unknown}, missing {missing}. Fix: use the output of "
                          f"{cls_name}.to_dict().")


def output_stem(cache_path: str | os.PathLike, tag: str, out: str | os.PathLike | None) -> Path:
    """Where a result goes: ``--out`` (a stem; ``.json``/``.csv`` stripped), inside ``--out`` as
    ``<cache stem>.<tag>`` when it is a folder (or ends with ``/``), or next to the cache so.

    Examples:
        >>> str(output_stem("caches/val.h5", "probe", None))
        'caches/val.probe'
        >>> str(output_stem("caches/val.h5", "probe", "results/")), str(output_stem(
        ...     "caches/val.h5", "probe", "results/p.json"))
        ('results/val.probe', 'results/p')
    """
    path = Path(cache_path)
    name = f"{Path(path.name.removesuffix('.partial')).stem}.{tag}"
    if out is None:
        return path.with_name(name)
    if str(out).endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / name
    out = Path(out)
    return out.with_suffix("") if out.suffix in (".json", ".csv") else out


def check_writable(stem: str | os.PathLike, *, force: bool = False) -> list[Path]:
    """The ``.json`` and ``.csv`` paths of a result stem; raise if one exists and not force."""
    stem = Path(stem)
    paths = [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".csv")]
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"results must not overwrite existing files; {', '.join(existing)} "
                          "exist. Fix: pass --force (force=True) or choose --out.")
    return paths


def write_json_csv(record: dict, rows: list[dict], stem: str | os.PathLike, *,
                   force: bool = False) -> list[Path]:
    """Write ``<stem>.json`` (the record) and ``<stem>.csv`` (the rows); refuse to replace
    existing files unless ``force``. Files are written whole then renamed."""
    paths = check_writable(stem, force=force)
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths[0].with_name(paths[0].name + ".tmp")
    tmp.write_text(json.dumps(jsonable(record), indent=2) + "\n")
    os.replace(tmp, paths[0])
    tmp = paths[1].with_name(paths[1].name + ".tmp")
    fields = list(rows[0]) if rows else ["point"]
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in jsonable(row).items()})
    os.replace(tmp, paths[1])
    return paths
