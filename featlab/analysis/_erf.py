"""Effective receptive field (Luo et al. 2016): input gradient of a centre unit, on data.

For each skip point, the gradient of the point's centre unit (summed over its channels) with
respect to the input image is taken per image, its absolute value summed over the input
channels, averaged over the images, and normalised to unit mass. The map shows where the unit
*actually* looks (usually a Gaussian-like blob much smaller than the theoretical field); the
radii holding 50 % and 90 % of the mass (Euclidean distance from the centre of the unit's
theoretical field, in input pixels) summarise it. Hooks exist only inside
:func:`featlab.capture` (``detach=False``), so the model is left untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from featlab.errors import ConfigError
from featlab.points import SkipPoint

__all__ = ["ERFMap", "effective_receptive_fields", "mass_radius"]


@dataclass(frozen=True, eq=False)
class ERFMap:
    """The effective receptive field of one point.

    Attributes:
        unit: the output unit (row, column) whose gradient was taken.
        centre: (row, column) in input pixels the radii are measured from (the centre of the
            unit's theoretical field, or the mass centroid when the field is unknown).
        radius50, radius90: smallest radius (input pixels) of a disc around ``centre`` holding
            50 % / 90 % of the gradient mass.
        map: ``[H, W]`` float64 mean absolute input gradient, normalised to sum 1.
        num_images: images averaged.
    """

    unit: tuple[int, int]
    centre: tuple[float, float]
    radius50: float
    radius90: float
    map: np.ndarray
    num_images: int

    def to_dict(self, with_map: bool = True) -> dict:
        d = {"unit": list(self.unit), "centre": list(self.centre), "radius50": self.radius50,
             "radius90": self.radius90, "num_images": self.num_images}
        if with_map:
            d["map"] = self.map.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ERFMap:
        return cls(tuple(d["unit"]), tuple(d["centre"]), d["radius50"], d["radius90"],
                   np.asarray(d.get("map", []), dtype=np.float64), d["num_images"])


def mass_radius(mass: np.ndarray, centre: tuple[float, float], fraction: float) -> float:
    """Smallest distance r from ``centre`` such that pixels within r hold ``fraction`` of
    the mass (pixel centres at integer coordinates).

    Examples:
        >>> m = np.zeros((5, 5)); m[2, 2] = 1; m[2, 4] = 1
        >>> mass_radius(m, (2, 2), 0.5), mass_radius(m, (2, 2), 0.9)
        (0.0, 2.0)
    """
    total = mass.sum()
    if total <= 0:
        return float("nan")
    yy, xx = np.indices(mass.shape)
    dist = np.hypot(yy - centre[0], xx - centre[1]).ravel()
    order = np.argsort(dist, kind="stable")
    cum = np.cumsum(mass.ravel()[order]) / total
    k = int(np.searchsorted(cum, fraction - 1e-12))
    return float(dist[order][min(k, len(order) - 1)])


def _centre(point: SkipPoint, unit: tuple[int, int], mass: np.ndarray) -> tuple[float, float]:
    if point.rf_status.startswith("exact") and point.rf_size is not None \
            and point.rf_stride is not None:
        c = (point.rf_size - 1) / 2 - point.rf_padding
        return (unit[0] * point.rf_stride + c, unit[1] * point.rf_stride + c)
    yy, xx = np.indices(mass.shape)
    return (float((yy * mass).sum() / mass.sum()), float((xx * mass).sum() / mass.sum()))


#: Images per forward and backward pass when :func:`effective_receptive_fields` gets one tensor.
ERF_BATCH = 8


def effective_receptive_fields(model: nn.Module, images: Iterable[torch.Tensor] | torch.Tensor,
                               points: Sequence[SkipPoint], *, device: str | torch.device = "cpu",
                               progress: bool = False) -> dict[str, ERFMap]:
    """ERF of each point, averaged over ``images`` (normalised network inputs).

    Args:
        model: the network (run in eval mode inside :func:`featlab.capture`; its flags are
            restored).
        images: ``[n, 3, H, W]`` tensor (run :data:`ERF_BATCH` at a time), or an iterable of
            such batches, already normalised.
        points: the skip points (from :func:`featlab.skip_points` at this input size, or a
            cache's records).
        device: where the forward/backward passes run.
        progress: a tqdm bar over batches.

    Returns:
        ``{point name: ERFMap}``.

    Examples:
        >>> import featlab, featlab.testing as ft
        >>> net = ft.TinyResNet()
        >>> pts = featlab.skip_points(net, 32, select="stages")
        >>> erf = effective_receptive_fields(net, ft.random_images(2, 32), pts)
        >>> erf["layer1.1"].map.shape, erf["layer1.1"].radius50 <= erf["layer1.1"].radius90
        ((32, 32), True)
    """
    from tqdm.auto import tqdm

    import featlab
    from featlab.runinfo import progress_enabled

    if not points:
        raise ConfigError("effective_receptive_fields needs at least one skip point; got none.")
    # one forward and backward per ERF_BATCH images: memory does not grow with their number
    # (resnet18 at 128 px keeps ~12 MB per image for the backward)
    batches = images.split(ERF_BATCH) if isinstance(images, torch.Tensor) else images
    names = [p.name for p in points]
    sums: dict[str, torch.Tensor] = {}
    units: dict[str, tuple[int, int]] = {}
    count = 0
    model_device = next(model.parameters(), torch.zeros(())).device
    model.to(device)
    try:
        with featlab.capture(model, [p.module for p in points], detach=False) as acts:
            for x in tqdm(batches, desc="effective RF", unit="batch",
                          disable=not progress_enabled(progress)):
                if x.ndim != 4:
                    raise ConfigError(f"images must be [n, C, H, W]; got {tuple(x.shape)}.")
                x = x.to(device=device, dtype=torch.float32).requires_grad_(True)
                with torch.enable_grad():
                    model(x)
                    for k, (name, p) in enumerate(zip(names, points)):
                        out = acts[p.module]
                        unit = (out.shape[2] // 2, out.shape[3] // 2)
                        units[name] = unit
                        (g,) = torch.autograd.grad(out[:, :, unit[0], unit[1]].sum(), x,
                                                   retain_graph=k < len(points) - 1)
                        part = g.detach().abs().sum(1).double().sum(0).cpu()
                        sums[name] = part if name not in sums else sums[name] + part
                count += x.shape[0]
    finally:
        model.to(model_device)
    if count == 0:
        raise ConfigError("effective_receptive_fields needs at least one image; got none.")
    out: dict[str, ERFMap] = {}
    for name, p in zip(names, points):
        mass = (sums[name] / count).numpy()
        total = mass.sum()
        norm = mass / total if total > 0 else mass
        centre = _centre(p, units[name], norm) if total > 0 else (float("nan"),) * 2
        out[name] = ERFMap(units[name], tuple(float(c) for c in centre),
                           mass_radius(norm, centre, 0.5), mass_radius(norm, centre, 0.9),
                           norm, count)
    return out
