"""Where a head's training features come from: a cache (frozen backbone, no backbone compute) or
images through the backbone (frozen or fine-tuned).

A source maps sample positions to ``(inputs, labels)`` on a device: ``inputs`` a dict
``point -> float32 [b, C, h, w]`` (caches) or normalized images ``[b, 3, H, W]`` (the model runs
the backbone), ``labels`` ``[b, H, W]`` int64 at the label's native resolution (never resized).
:func:`check_caches` is the R-8.3 check that a train and a val cache
(and a head's recorded config) come from the same backbone, weights, input size and points.

Examples:
    >>> import torch
    >>> src = TensorSource({"a": torch.ones(4, 2, 2, 2)}, torch.zeros(4, 8, 8, dtype=torch.uint8))
    >>> feats, labels = src.get([3, 1], "cpu")
    >>> feats["a"].shape, labels.dtype
    (torch.Size([2, 2, 2, 2]), torch.int64)
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from featlab import distributed as fdist
from featlab.errors import CacheError, FeatlabWarning

log = logging.getLogger("featlab")

__all__ = ["CacheSource", "Preloads", "TensorSource", "ImageSource", "check_caches"]

_STATS_SAMPLES = 256  # first samples whose features fix the per-channel standardisation


def check_caches(train, val, points: Sequence[str]) -> None:
    """Raise :class:`CacheError` unless both caches hold ``points`` from the same backbone.

    Compared: the backbone (:func:`~featlab.cache.joins.backbone_difference`: its record and
    the hash of the model state the features were computed with, which stands for the weights
    where both caches have it), the network input size, the classes and each point's record
    (channels, stride); every point must be stored whole (no pooling, every channel).
    Different splits are the point; identical sample ids are refused (a
    head validated on its training images measures nothing).
    """
    from featlab.cache.joins import backbone_difference

    a, b = train.identity(), val.identity()
    differs = backbone_difference(train, val)
    if differs is None and a["input_size"] != b["input_size"]:
        differs = "input_size", a["input_size"], b["input_size"]
    if differs is not None:
        key, there, here = differs
        raise CacheError(f"train and val caches must come from the same backbone setup; "
                         f"{key} differs: {there!r} in {a['path']} vs {here!r} in "
                         f"{b['path']}. Fix: extract both with the same --model, --weights "
                         "and --input-size.")
    if tuple(train.classes) != tuple(val.classes):
        raise CacheError(f"train and val caches must have the same classes; got "
                         f"{list(train.classes)} and {list(val.classes)}. Fix: extract both "
                         "from the same data set.")
    for name in points:
        for cache in (train, val):
            cache.point(name)  # PointNotInCacheError lists what is there
        pa, pb = train.point(name), val.point(name)
        if (pa.channels, pa.stride) != (pb.channels, pb.stride):
            raise CacheError(f"point {name!r} must have the same record in both caches; got "
                             f"{pa.channels} channels / stride {pa.stride} and {pb.channels} / "
                             f"{pb.stride}. Fix: extract both with the same settings.")
        if train.stored_size(name) != tuple(pa.size) or val.stored_size(name) != tuple(pb.size):
            raise CacheError(f"point {name!r} must be stored at full size to train a head; it "
                             f"was pooled (max_size). Fix: re-extract without --max-size.")
        for cache, rec in ((train, pa), (val, pb)):
            if len(cache.stored_channels(name)) != rec.channels:
                raise CacheError(f"point {name!r} must be stored with all its {rec.channels} "
                                 f"channels to train a head; {cache.path} keeps "
                                 f"{len(cache.stored_channels(name))} (max_channels). Fix: "
                                 "re-extract without --max-channels.")
    if a["ids_sha256"] == b["ids_sha256"]:
        raise CacheError(f"train and val caches must hold different samples; both hold the "
                         f"same ids ({a['path']}, {b['path']}). Fix: extract --split val for "
                         "the validation cache.")


def _stats(batches) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std (float64 sums) over an iterable of feature dicts."""
    sums: dict[str, list] = {}
    for feats in batches:
        for name, x in feats.items():
            x = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
            s = sums.setdefault(name, [0, 0.0, 0.0])
            s[0] += x.shape[1]
            s[1] = s[1] + x.sum(1)
            s[2] = s[2] + (x * x).sum(1)
    out = {}
    for name, (n, s1, s2) in sums.items():
        mean = s1 / n
        out[name] = (mean.float(), (s2 / n - mean * mean).clamp_min(0).sqrt().float())
    return out


class TensorSource:
    """Features and labels held in memory (a preloaded cache, or tensors in tests)."""

    def __init__(self, features: dict[str, torch.Tensor], labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def get(self, positions, device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        idx = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        # moved as stored (float16 caches: half the bytes), cast where the head runs
        feats = {k: v[idx].to(device).float() for k, v in self.features.items()}
        return feats, self.labels[idx].to(device, torch.int64)

    def stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        n = min(len(self), _STATS_SAMPLES)
        return _stats(self.get(range(i, min(n, i + 32)), "cpu")[0] for i in range(0, n, 32))


class Preloads:
    """Arrays of caches read into memory once and kept for the runs that need them again.

    Every run of a sweep needs the last point and the labels of both caches, and each skip
    point comes back once per seed. A skip point of a real cache is many GB (resnet50's
    ``layer1`` over VOC train at 512 px in float16: 12 GB), minutes of reading on a cluster's
    file system, so a sweep shares one store among its runs and reads each array once while its
    budget holds them all.

    :meth:`run` scopes one run: the arrays it takes stay held until it ends. To make room for a
    new array the store drops held arrays that the current run does not use, most recently
    used first: a sweep cycles through its points, and under a cycle that keeps the most of
    them for the next round. An array that cannot fit even then is not preloaded (a warning;
    that source reads per batch). Arrays are known by the cache's path and modification time: a
    cache written again at the same path is read again.

    Args:
        budget: bytes it may hold; default :func:`~featlab.allocator.memory_budget` (80 % of
            the memory available now) divided among the processes of this node (``torchrun``:
            each holds its own copy); no limit where that cannot be read.

    Attributes:
        bytes_read: bytes read from caches so far (what sharing saves is visible here).
    """

    def __init__(self, budget: int | None = None):
        from featlab.allocator import memory_budget

        self.ranks = fdist.info_from_env().local_world_size
        self._derived = budget is None
        if budget is None:
            budget = memory_budget()
            budget = None if budget is None else budget // self.ranks
        self.budget = budget
        self._held: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # by last use
        self._in_use: set[tuple] = set()
        self.bytes_read = 0

    @contextlib.contextmanager
    def run(self) -> Iterator[Preloads]:
        """One run's scope: what it takes is not dropped to make room until the scope ends."""
        try:
            yield self
        finally:
            self._in_use.clear()

    @property
    def held_bytes(self) -> int:
        return sum(t.nbytes for t in self._held.values())

    def take(self, cache, points: Sequence[str]) -> tuple[dict[str, torch.Tensor],
                                                          torch.Tensor] | None:
        """The ``points`` and labels of ``cache`` in memory (stored dtype), or None (with a
        warning) when they cannot fit in the budget beside what the current run holds."""
        from featlab.cache.plan import format_bytes

        # the file as it is now: a cache written again at the same path is another cache
        path = (str(cache.path), os.stat(cache.path).st_mtime_ns)
        wanted = {(path, p): cache[p] for p in points}
        wanted[(path, _LABELS)] = cache.labels
        need = sum(a.nbytes for k, a in wanted.items() if k not in self._held)
        # what may be dropped: arrays neither this source nor the rest of the run uses
        spare = [k for k in self._held if k not in wanted and k not in self._in_use]
        kept = self.held_bytes - sum(self._held[k].nbytes for k in spare)
        if self.budget is not None and kept + need > self.budget:
            from featlab.allocator import BUDGET_SHARE

            budget = f"the budget is {format_bytes(self.budget)}" + (
                f" per process ({BUDGET_SHARE:.0%} of the available memory, shared by "
                f"{self.ranks} process(es) on this node)" if self._derived else "")
            held = f" ({format_bytes(kept)} held for this run)" if kept else ""
            warnings.warn(
                f"preloading must fit in memory; {cache.path} needs {format_bytes(need)} more"
                f"{held}, and {budget}: reading per batch instead (slower). Fix: --no-preload "
                "says so up front, or store fewer points.", FeatlabWarning, stacklevel=4)
            return None
        for key in reversed(spare):  # most recently used first
            if self.budget is None or self.held_bytes + need <= self.budget:
                break
            del self._held[key]
        for key, array in wanted.items():
            if key not in self._held:
                self._held[key] = array.torch()
                self.bytes_read += array.nbytes
            self._held.move_to_end(key)
        self._in_use.update(wanted)
        return ({p: self._held[(path, p)] for p in points}, self._held[(path, _LABELS)])


_LABELS = "/labels"  # the key of a cache's labels in a Preloads (no point is named so)


class CacheSource(TensorSource):
    """Points of a cache held in memory as stored (``preload``: a :class:`Preloads`, which may
    share them with other runs, or True for a store of this source's own), or read per batch
    (``preload`` False or None, or when they do not fit)."""

    def __init__(self, cache, points: Sequence[str], preload: bool | Preloads | None = True):
        self.cache, self.points = cache, list(points)
        store = Preloads() if preload is True else preload or None
        held = store.take(cache, self.points) if store is not None else None
        self.preload = held is not None
        if held is not None:
            super().__init__(*held)

    def __len__(self) -> int:
        return len(self.cache)

    def get(self, positions, device):
        if self.preload:
            return super().get(positions, device)
        pos = np.asarray(positions, dtype=np.int64)
        feats = {p: torch.from_numpy(self.cache[p][pos]).to(device).float()
                 for p in self.points}
        return feats, torch.from_numpy(self.cache.labels[pos]).to(device, torch.int64)


class ImageSource:
    """Samples of a data set run through the backbone on every access.

    Args:
        dataset: a featlab data set (items with ``"image"`` in [0, 1] and ``"mask"``).
        rows: which data-set indices make up the source (e.g. a cache's ``index``).
        backbone: a :class:`~featlab.segment.heads.FrozenBackbone` (no gradients), or the model
            to fine-tune (``finetune=True``); used here only for the feature statistics.
        spec: the :class:`~featlab.models.BackboneSpec` whose normalization the weights expect.
        points: the points to return.
    """

    def __init__(self, dataset, rows: Sequence[int], backbone: nn.Module, spec,
                 points: Sequence[str], finetune: bool = False):
        self.dataset, self.rows = dataset, np.asarray(rows, dtype=np.int64)
        self.backbone, self.spec, self.points = backbone, spec, list(points)
        self.finetune = finetune

    def __len__(self) -> int:
        return len(self.rows)

    def images(self, positions) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self.dataset[int(self.rows[p])] for p in positions]
        x = torch.stack([it["image"] for it in items]).float()
        y = torch.stack([torch.as_tensor(it["mask"]) for it in items]).to(torch.int64)
        return self.spec.normalize(x), y

    def get(self, positions, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images ``[b, 3, H, W]`` (the model runs the backbone) and labels."""
        x, y = self.images(positions)
        return x.to(device), y.to(device)

    def stats(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        from featlab.capture import capture

        # eval-mode features of the underlying model; its modes and requires_grad are untouched
        model = self.backbone if self.finetune else self.backbone.model
        device = next(model.parameters()).device
        n = min(len(self), _STATS_SAMPLES)  # the samples CacheSource uses: the same head
        feats = []
        with torch.no_grad():
            for i in range(0, n, 16):
                with capture(model, self.points) as acts:
                    model(self.images(range(i, min(n, i + 16)))[0].to(device))
                feats.append({k: acts[k].cpu() for k in self.points})
        return _stats(feats)
