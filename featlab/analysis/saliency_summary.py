"""How much saliency falls on the target object, per skip point, over a data set.

For each sample the target is its *dominant object class*: the most frequent class of the
label mask other than background (class 0) and the ignore index, its mask every pixel of that
class (objects sharing it count together); samples with no object are skipped. The objective
is that class's logit for a classifier (``ClassLogit``), or its logit summed over the
ground-truth region for a segmentation output of the label's size (``ClassRegion(cls, mask)``).
The target class indexes the model's outputs directly, so the model's classes must be the data
set's (e.g. ``shapes`` weights from ``featlab pretrain``; a random or ImageNet classifier gives a
well-defined but arbitrary target).

The score per sample and point is an energy-based pointing game: the share of *positive*
saliency mass (of the map upsampled to the label size) inside the object's mask,
``sum(relu(m) * mask) / sum(relu(m))`` (undefined, and left out, when a map has no positive
mass). ``mask_fraction``, the mask's share of the image, is what a uniform map would score.

Examples:
    >>> m = torch.tensor([[[1.0, 3.0], [-2.0, 0.0]]])
    >>> mask = torch.tensor([[[False, True], [True, False]]])
    >>> energy_in_mask(m, mask).tolist()
    [0.75]
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from featlab.analysis._io import write_json_csv
from featlab.analysis.saliency import (CAM_METHODS, INPUT, METHODS, ClassLogit, ClassRegion,
                                       _name, attribute, resolve_points)
from featlab._records import check_record
from featlab.distributed import resolve_device
from featlab.errors import ConfigError

__all__ = ["energy_in_mask", "dominant_class", "SaliencyResult", "saliency_summary",
           "saliency_examples", "plot_saliency_grid", "write_summary"]

log = logging.getLogger("featlab")


def energy_in_mask(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Share of positive mass of ``maps`` [N, H, W] inside boolean ``masks`` [N, H, W] (NaN
    where a map has no positive mass)."""
    pos = maps.clamp(min=0).double()
    total = pos.sum((1, 2))
    inside = (pos * masks.to(pos.dtype)).sum((1, 2))
    return torch.where(total > 0, inside / total.clamp(min=1e-300),
                       torch.full_like(total, math.nan))


def dominant_class(mask: np.ndarray | torch.Tensor, ignore_index: int = 255,
                   background: int = 0) -> int | None:
    """Most frequent class of ``mask`` other than background and ignore (None if none).

    Examples:
        >>> dominant_class(np.array([[0, 2, 2], [1, 255, 0]]))
        2
    """
    values = np.asarray(mask).reshape(-1)
    values = values[(values != ignore_index) & (values != background)]
    if not len(values):
        return None
    return int(np.bincount(values).argmax())


@dataclass(frozen=True)
class SaliencyResult:
    """Pointing-game summary per point: ``rows()`` gives ``point, stride, energy_in_mask,
    energy_std, mask_fraction, samples``."""

    method: str
    points: tuple[dict, ...]
    settings: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


    def __repr__(self) -> str:  # one line: the table is rows()
        return f"SaliencyResult({self.method}, {len(self.points)} points)"

    def rows(self) -> list[dict]:
        return [dict(p) for p in self.points]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["points"] = [dict(p) for p in self.points]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SaliencyResult:
        check_record(cls, d)
        return cls(**{**d, "points": tuple(dict(p) for p in d.get("points", ()))})


def _targets(model_out_ndim: int, labels: torch.Tensor, out_size: tuple[int, int] | None,
             ignore_index: int) -> tuple[list, list[int]]:
    targets, keep = [], []
    for i, lab in enumerate(labels):
        cls = dominant_class(lab.numpy(), ignore_index)
        if cls is None:
            continue
        keep.append(i)
        if model_out_ndim == 2:
            targets.append(ClassLogit(cls))
        else:
            region = (lab == cls) if out_size == tuple(lab.shape) else None
            targets.append(ClassRegion(cls, region))
    return targets, keep


def _output_shape(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    training = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            return tuple(model(x[:1]).shape)
    finally:
        for m, t in training:
            m.training = t


def _batches(model, dataset, spec, limit, batch_size, device):
    """Normalised inputs, labels, targets and kept indices, ``batch_size`` samples at a time."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    ignore = getattr(dataset, "ignore_index", 255)
    shape = None
    for start in range(0, n, batch_size):
        items = [dataset[i] for i in range(start, min(n, start + batch_size))]
        images = torch.stack([s["image"] for s in items])
        labels = torch.stack([s["mask"] for s in items]).to(torch.int64)
        x = (spec.normalize(images) if spec is not None else images).to(device)
        if shape is None:
            shape = _output_shape(model, x)
        out_size = tuple(shape[2:]) if len(shape) == 4 else None
        targets, keep = _targets(len(shape), labels, out_size, ignore)
        if len(shape) == 2:
            bad = [t.cls for t in targets if t.cls >= shape[1]]
            if bad:
                classes = list(getattr(dataset, "classes", ()))
                name = getattr(dataset, "name", type(dataset).__name__)
                weights = "" if spec is None else f" (weights {spec.weights!r})"
                raise ConfigError(
                    f"the model must have an output for every target class; it has "
                    f"{shape[1]} outputs{weights}, and {name} has {len(classes) or 'more'} classes "
                    f"(a sample's target is class {bad[0]}). Fix: use weights trained on the "
                    f"classes of {name} (a checkpoint of yours: --weights PATH); --weights shapes "
                    "fits --data shapes.")
        if keep:
            yield images[keep], labels[keep], x[keep], targets


def saliency_summary(model: torch.nn.Module, dataset: Any, points: Any = "stages", *,
                     method: str = "gradcam", spec: Any = None, limit: int | None = None,
                     batch_size: int = 8, relu: bool = True, seed: int = 0,
                     device: str | None = None, progress: bool = True,
                     **options: Any) -> SaliencyResult:
    """Average energy-in-mask per point over (the first ``limit`` samples of) ``dataset``.

    Args:
        model: a classifier (``[N, K]`` output) or segmentation network (``[N, K, H, W]``).
        dataset: a featlab data set (items with ``image`` in [0, 1] and ``mask``).
        points: skip-point selection, names and/or ``"input"``.
        method: one of ``METHODS``; ``relu``/``seed``/``options`` go to it.
        spec: the weights' :class:`~featlab.models.BackboneSpec` (normalisation); default
            ``model.featlab_spec`` if set, else none.
        limit, batch_size: samples used and per pass.
        device: where the model runs (default: the model's parameters' device).
    """
    from tqdm.auto import tqdm

    from featlab.points import skip_points
    from featlab.runinfo import progress_enabled, run_versions

    if method not in METHODS:
        raise ConfigError(f"saliency method must be one of {', '.join(METHODS)}; got "
                          f"{method!r}. Fix: e.g. method='gradcam'.")
    for name, value in (("limit", limit), ("batch_size", batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"`{name}` of saliency_summary must be a positive integer; got "
                              f"{value!r}. Fix: e.g. --{name.replace('_', '-')} 64.")
    spec = spec if spec is not None else getattr(model, "featlab_spec", None)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    size = tuple(dataset[0]["image"].shape[-2:])
    selected = resolve_points(model, points, size)
    names = [_name(p) for p in selected]
    strides = {p.name: p.stride for p in skip_points(model, input_size=size)}
    strides[INPUT] = 1
    scores: dict[str, list[float]] = {n: [] for n in names}
    fractions: list[float] = []
    n = len(dataset) if limit is None else min(limit, len(dataset))
    bar = tqdm(total=n, desc=f"saliency {method}", unit="img",
               disable=not progress_enabled(progress))
    first = 0
    for images, labels, x, targets in _batches(model, dataset, spec, limit, batch_size, dev):
        maps = attribute(model, x, targets, selected, method=method, relu=relu, seed=seed,
                         first=first, **options)
        first += len(images)
        masks = torch.stack([lab == t.cls for lab, t in zip(labels, targets)]).to(dev)
        for name in names:
            scores[name] += energy_in_mask(maps[name].upsampled, masks).tolist()
        fractions += masks.double().mean((1, 2)).tolist()
        bar.update(len(images))
    bar.close()
    rows = []
    fraction = np.asarray(fractions, dtype=np.float64)
    for name in names:
        # a sample whose map has no positive mass scores NaN and is left out of the point's
        # mean; its uniform-map baseline then is too, so the two columns compare like for like
        scored = np.asarray(scores[name], dtype=np.float64)
        kept = ~np.isnan(scored)
        v = scored[kept]
        rows.append({"point": name, "stride": strides.get(name),
                     "energy_in_mask": float(v.mean()) if len(v) else None,
                     "energy_std": float(v.std()) if len(v) else None,
                     "mask_fraction": float(fraction[kept].mean()) if len(v) else None,
                     "samples": int(len(v))})
    settings = {"points": points if isinstance(points, str) else [_name(p) for p in points],
                "limit": limit, "batch_size": batch_size, "relu": relu if method in CAM_METHODS
                else None, "seed": seed, "target": "dominant object class; mask = its label "
                "region", **_method_options(method, options)}
    return SaliencyResult(method, tuple(rows), settings,
                          spec.to_dict() if hasattr(spec, "to_dict") else {},
                          dataset.settings() if hasattr(dataset, "settings") else {},
                          run_versions(dev))


def _method_options(method: str, options: dict) -> dict:
    """The method's own options as it ran them: its defaults, replaced by those given (a
    record that says ``n_samples: 16`` is reproducible when the default changes)."""
    import inspect

    from featlab.analysis import saliency as S

    fn = {"smoothgrad": S.smoothgrad, "ig": S.integrated_gradients}.get(method)
    shared = {"relu", "seed", "first", "max_batch"}  # recorded on their own, or not results
    found = {} if fn is None else {
        name: p.default for name, p in inspect.signature(fn).parameters.items()
        if p.kind is p.KEYWORD_ONLY and name not in shared}
    return {**found, **options}


def saliency_examples(model: torch.nn.Module, dataset: Any, points: Any = "stages", *,
                      method: str = "gradcam", spec: Any = None, count: int = 4,
                      relu: bool = True, seed: int = 0, device: str | None = None,
                      **options: Any) -> dict[str, Any]:
    """Images, masks and maps of the first ``count`` samples with an object, for figures:
    ``{"images": [n,3,H,W] in [0,1], "masks": [n,H,W] bool, "classes": [n], "maps":
    {point: [n,H,W] upsampled}}``."""
    spec = spec if spec is not None else getattr(model, "featlab_spec", None)
    dev = resolve_device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    selected = resolve_points(model, points, tuple(dataset[0]["image"].shape[-2:]))
    for images, labels, x, targets in _batches(model, dataset, spec, count, count, dev):
        maps = attribute(model, x, targets, selected, method=method, relu=relu, seed=seed,
                         **options)
        return {"images": images, "masks": torch.stack([lab == t.cls for lab, t in
                                                        zip(labels, targets)]),
                "classes": [t.cls for t in targets],
                "maps": {k: m.upsampled.cpu() for k, m in maps.items()}}
    raise ConfigError(f"the data set must have a sample with an object among the first "
                      f"{count}; got none. Fix: raise --limit.")


def plot_saliency_grid(examples: dict[str, Any], path: str | os.PathLike, *,
                       title: str = "", class_names: Any = None) -> Path:
    """Write a PNG grid: one row per sample; columns image, mask, one map per point."""
    from matplotlib.figure import Figure  # no pyplot: no global state, Agg canvas

    images, masks, maps = examples["images"], examples["masks"], examples["maps"]
    n, cols = len(images), 2 + len(maps)
    fig = Figure(figsize=(1.6 * cols, 1.7 * n + 0.4), layout="constrained")
    axes = fig.subplots(n, cols, squeeze=False)
    for i in range(n):
        cls = examples["classes"][i]
        name = class_names[cls] if class_names is not None and cls < len(class_names) else cls
        panels = [("image", images[i].permute(1, 2, 0).numpy(), None),
                  ("target mask", masks[i].numpy(), "gray")]
        panels += [(k, m[i].numpy(), "inferno") for k, m in maps.items()]
        for ax, (label, img, cmap) in zip(axes[i], panels):
            ax.imshow(img, cmap=cmap, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=8)
        axes[i][1].set_xlabel(str(name), fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    return out


def write_summary(result: SaliencyResult, out_dir: str | os.PathLike, *,
                  force: bool = False) -> tuple[Path, Path]:
    """Write ``saliency.json`` and ``saliency.csv`` into ``out_dir`` (no overwrite unless
    ``force``)."""
    js, cs = write_json_csv(result.to_dict(), result.rows(), Path(out_dir) / "saliency",
                            force=force)
    log.info("wrote %s and %s", js, cs)
    return js, cs
