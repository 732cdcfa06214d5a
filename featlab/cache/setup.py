"""Everything :func:`~featlab.cache.writer.extract` settles before the first sample.

:func:`prepare_job` checks the arguments, finds the spec, the process's rank and its shard of
the sorted samples, the input size, the skip points, the device, the settings that identify the
cache, the file layout and attributes, and the storage plan -- in that order, so that a wrong
argument or an unwritable folder fails before any compute.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from featlab import distributed as fdist
from featlab.cache import h5file
from featlab.cache import schema as S
from featlab.cache.files import CachePaths, check_writable, refuse_complete
from featlab.cache.plan import (ExtractPlan, channel_subset, check_dtype, check_error_stat,
                                check_max_channels, check_max_size, free_disk_bytes,
                                plan_extract)
from featlab.cache.settings import (ExtractSettings, absolute_root, ids_fingerprint,
                                    state_fingerprint)
from featlab.errors import ConfigError
from featlab.points import unwrap_model

__all__ = ["Job", "prepare_job"]

log = logging.getLogger("featlab")


@dataclass(frozen=True)
class Job:
    """One rank's extraction, fully resolved."""

    root: nn.Module
    dataset: Any
    spec: Any
    info: fdist.DistInfo
    paths: CachePaths
    shard: range
    ids: list[str]
    index: np.ndarray
    points: list[Any]
    stored: list[tuple[int, int]]
    channels: list[tuple[int, ...] | None]  # per point: the channels kept, None = every one
    settings: ExtractSettings
    layout: h5file.FileLayout
    attrs: dict[str, Any]
    plan: ExtractPlan
    device: torch.device
    batch_size: int
    num_workers: int
    queue_size: int


def prepare_job(model: nn.Module, dataset: Any, points: Any, path: str | os.PathLike, *,
                spec: Any = None, batch_size: int = 32, dtype: str = "float16",
                error_stat: str = "bound", max_size: int | None = None, limit: int | None = None,
                max_channels: int | None = None, channel_seed: int = 0, save_images: bool = False,
                compression: str | None = None, device: str | torch.device | None = None,
                num_workers: int | None = None, force: bool = False, queue_size: int = 2,
                probe: bool = True) -> Job:
    """Resolve one rank's extraction (``probe``: also join the process group and check that
    the destination folder is writable)."""
    _check_int("batch_size", batch_size, 1)
    _check_int("queue_size", queue_size, 1)
    if limit is not None:
        _check_int("limit", limit, 1)
    if num_workers is not None:
        _check_int("num_workers", num_workers, 0)
    for name, value in (("save_images", save_images), ("force", force)):
        if not isinstance(value, bool):
            raise ConfigError(f"`{name}` must be True or False; got {value!r}.")
    dtype, max_size = check_dtype(dtype), check_max_size(max_size)
    max_channels = check_max_channels(max_channels)
    _check_int("channel_seed", channel_seed, 0)
    # float32 storage loses nothing: its recorded error, 0, is exact whatever was asked
    error_stat = check_error_stat(error_stat) if dtype == "float16" else "exact"
    root = unwrap_model(model)
    spec = _resolve_spec(model, root, spec)
    ids_all = _check_dataset(dataset)
    device = fdist.resolve_device(device, require=probe)
    info = fdist.init(device=device) if probe else fdist.info_from_env()
    paths = CachePaths.make(path, info.rank, info.world_size)
    if probe:
        check_writable(paths.out)
        # refused before any compute; with a partial file beside it (left by a run stopped
        # just after finalising) files.prepare refuses, once it holds the lock that lets it
        # delete that file
        if not force and os.path.exists(paths.out) and not os.path.exists(paths.partial):
            refuse_complete(paths.out)
    n = len(ids_all) if limit is None else min(limit, len(ids_all))
    if limit is not None and limit > n and info.is_main and probe:
        log.info("--limit %d is more than the %d samples of %s %s: all %d are extracted", limit,
                 n, getattr(dataset, "name", "the data set"), getattr(dataset, "split", ""), n)
    if n < info.world_size:  # every rank writes a shard of at least one sample
        raise ConfigError(f"every one of the {info.world_size} processes must get a sample; got "
                          f"{n} samples. Fix: run at most {n} processes (torchrun "
                          "--nproc_per_node), or extract more samples (--limit).")
    stored_ids = ids_all[:n]
    shard = fdist.shard_range(n, info.rank, info.world_size)
    first = dataset[0]
    input_size = tuple(int(v) for v in first["image"].shape[-2:])
    pts, passed = _resolve_points(root, points, input_size)
    channels = [channel_subset(p.name, p.channels, max_channels, channel_seed) for p in pts]
    if num_workers is None:
        num_workers = min(4, max(0, (os.cpu_count() or 1) // info.local_world_size - 1))
    id_length = max((len(i.encode("utf-8")) for i in stored_ids), default=1)
    plan = plan_extract(pts, n, input_size, dtype=dtype, max_size=max_size,
                        max_channels=max_channels, compression=compression,
                        save_images=save_images,
                        batch_size=batch_size, queue_size=queue_size,
                        num_workers=num_workers, device=device.type, id_bytes=id_length,
                        weight_bytes=sum(t.numel() * t.element_size() for t in
                                         (*root.parameters(), *root.buffers())),
                        free_bytes=free_disk_bytes(paths.out), forward_points=passed)
    settings = ExtractSettings(
        model=spec.to_dict(), model_state=state_fingerprint(root),
        data=absolute_root(dataset.settings()), ids_sha256=ids_fingerprint(stored_ids),
        num_samples=n, points=tuple(p.name for p in pts), input_size=input_size, dtype=dtype,
        max_size=max_size, limit=limit, save_images=save_images, world_size=info.world_size,
        error_stat=error_stat, max_channels=max_channels,
        channel_seed=channel_seed if any(c is not None for c in channels) else 0)
    stored = [pp.stored_size for pp in plan.points]
    layout = h5file.FileLayout(
        num_rows=len(shard), input_size=input_size, dtype=dtype,
        points=tuple(h5file.PointLayout(
            pp.name, (pp.stored_channels, *pp.stored_size),
            min(pp.chunk_rows, max(1, len(shard))),
            {"skip_point": _json({**p.to_dict(), "rf_status": p.rf_status,
                                  **({"aliases": list(p.aliases)} if p.aliases else {})}),
             "stored_size": _json(list(pp.stored_size)), "pooling": pp.pooling,
             **({} if kept is None else {"channels": _json(list(kept))})})
            for p, pp, kept in zip(pts, plan.points, channels)),
        save_images=save_images, id_length=id_length, error_stat=error_stat,
        label_chunk_rows=_rows(input_size[0] * input_size[1], len(shard), batch_size),
        image_chunk_rows=_rows(3 * input_size[0] * input_size[1], len(shard), batch_size))
    attrs = _root_attrs(root, dataset, settings, spec, info, device, batch_size, len(shard))
    if info.world_size > 1:
        attrs["shard"] = _json({"rank": info.rank, "world_size": info.world_size,
                                "start": shard.start, "stop": shard.stop})
    return Job(root, dataset, spec, info, paths, shard, stored_ids[shard.start:shard.stop],
               np.arange(shard.start, shard.stop, dtype=np.int64), pts, stored, channels, settings,
               layout, attrs, plan, device, batch_size, num_workers, queue_size)


def _rows(row_bytes: int, rows: int, batch_size: int) -> int:
    from featlab.cache.plan import chunk_rows

    return chunk_rows(row_bytes, max(1, rows), batch_size)


def _root_attrs(root: nn.Module, dataset: Any, settings: ExtractSettings, spec: Any,
                info: fdist.DistInfo, device: torch.device, batch_size: int, rows: int
                ) -> dict[str, Any]:
    cudnn = torch.backends.cudnn
    try:
        amp = bool(torch.is_autocast_enabled(device.type))
    except TypeError:  # older torch: no device argument
        amp = bool(torch.is_autocast_enabled())
    param = next(root.parameters(), None)
    runtime = {
        "device": str(device), "world_size": info.world_size, "training": False,
        "inference_mode": True, "amp": amp, "batch_size": batch_size,
        "dtype": settings.dtype, "compute_dtype": str(param.dtype if param is not None
                                                      else torch.float32).removeprefix("torch."),
        "cudnn": {"enabled": bool(cudnn.enabled), "benchmark": bool(cudnn.benchmark),
                  "deterministic": bool(cudnn.deterministic),
                  "allow_tf32": bool(cudnn.allow_tf32)},
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "num_threads": torch.get_num_threads(),
    }
    return {
        "schema": S.SCHEMA, "schema_version": S.SCHEMA_VERSION, "complete": False,
        "num_samples": rows, "point_names": _json(list(settings.points)),
        "model": _json(spec.to_dict()), "data": _json(settings.data),
        "classes": _json(list(getattr(dataset, "classes", ()))),
        "ignore_index": int(getattr(dataset, "ignore_index", 255)),
        "ids_sha256": settings.ids_sha256, "input_size": _json(list(settings.input_size)),
        "dtype": settings.dtype, "max_size": settings.max_size, "settings": settings.to_json(),
        "versions": _json(h5file.versions()), "runtime": _json(runtime),
        "created": h5file.now_iso(), "world_size": info.world_size,
    }


_FLAGS = {"batch_size": "--batch-size", "limit": "--limit", "num_workers": "--workers",
          "channel_seed": "--channel-seed"}


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        flag = f" ({_FLAGS[name]})" if name in _FLAGS else ""
        raise ConfigError(f"`{name}`{flag} must be an int >= {low}; got {value!r}. Fix: pass "
                          f"{low} or more.")


def _resolve_spec(model: nn.Module, root: nn.Module, spec: Any) -> Any:
    from featlab.models import BackboneSpec

    if spec is None:
        spec = getattr(model, "featlab_spec", None) or getattr(root, "featlab_spec", None)
    if spec is None:
        raise ConfigError(
            f"`spec` must give the normalization the weights expect; got none, and the "
            f"{type(root).__name__} has no featlab_spec attribute (get_backbone sets one). Fix: "
            "pass spec= the BackboneSpec get_backbone returned, or BackboneSpec(name, weights, "
            "mean, std, input_size, num_classes) for your own model.")
    if isinstance(spec, Mapping):
        spec = BackboneSpec.from_dict(dict(spec))
    if not isinstance(spec, BackboneSpec):
        raise ConfigError(f"`spec` must be a featlab BackboneSpec; got {type(spec).__name__}.")
    return spec


def _check_dataset(dataset: Any) -> list[str]:
    from torch.utils.data import DataLoader

    if isinstance(dataset, DataLoader):
        raise ConfigError("`dataset` must be a data set, not a DataLoader: extraction builds its "
                          "own loader over the sorted samples (no shuffling). Fix: pass "
                          "loader.dataset.")
    ids = getattr(dataset, "ids", None)
    if not isinstance(ids, Sequence) or not callable(getattr(dataset, "settings", None)):
        raise ConfigError(f"`dataset` must be a featlab data set (sample ids in a fixed sorted "
                          f"order as .ids, .settings()); got {type(dataset).__name__}. Fix: "
                          "featlab.load_dataset(...), or subclass "
                          "featlab.data.SegmentationDataset.")
    ids = [str(i) for i in ids]
    if len(ids) != len(dataset) or len(set(ids)) != len(ids):
        raise ConfigError(f"`dataset.ids` must name each of its {len(dataset)} samples once; got "
                          f"{len(ids)} ids, {len(set(ids))} distinct. Fix: give every sample a "
                          "unique id.")
    if not ids:
        raise ConfigError("`dataset` must hold at least one sample; got an empty data set.")
    return ids


def _resolve_points(root: nn.Module, points: Any, input_size: tuple[int, int]
                    ) -> tuple[list[Any], list[Any]]:
    """The selected points, and every skip point up to the deepest of them (execution order).
    A model torch.fx cannot trace is measured by hooks when the points are module names."""
    from featlab.errors import GraphTraceError
    from featlab.hooked import hooked_points
    from featlab.points import skip_points
    from featlab.selection import _select

    if points is None:
        points = "all"
    if not isinstance(points, str) and isinstance(points, Sequence):
        points = [p if isinstance(p, str) else getattr(p, "name", p) for p in points]
    try:
        found = skip_points(root, input_size=input_size)
    except GraphTraceError:
        names = [n.strip() for n in points.split(",")] if isinstance(points, str) else points
        modules = dict(root.named_modules())
        if not all(isinstance(n, str) and n and n in modules for n in names):
            raise  # a preset or pattern needs the traced graph
        selected = hooked_points(root, names, input_size)
        return selected, selected
    selected = _select(found, points, root)  # errors name the model, and its `featlab points`
    names = [p.name for p in found]
    deepest = max((names.index(p.name) for p in selected if p.name in names), default=-1)
    return selected, found[:deepest + 1] or selected


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
