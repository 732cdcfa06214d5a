"""Saliency at every skip point: input gradients, SmoothGrad, integrated gradients, Grad-CAM,
LayerCAM.

Every method needs the gradient of one scalar objective per sample with respect to the
activations of the chosen points (and, for input-level maps, to the input). featlab gets *all*
of them from one forward and one backward pass: :func:`featlab.capture` with ``detach=False``
keeps each point's output in the graph (the model continues with a clone, so in-place ops after
a point cannot corrupt it, R-11.4), then one ``torch.autograd.grad`` call returns the gradients
at every point at once. The hooks live only inside the ``capture`` context manager, whose
``finally`` removes them (R-11.3). ``"input"`` is a pseudo point: the network input itself.

Targets (R-11.1; the objective is summed over the batch, samples are independent in eval mode):

* an ``int`` ``k`` or ``ClassLogit(k)``: logit ``k`` of a classifier output ``[N, K]``; on a
  segmentation output ``[N, K, H, W]`` an int means ``ClassRegion(k)``;
* ``ClassRegion(k, mask)``: the sum of logit ``k`` over a region of a segmentation output:
  ``mask=None`` every pixel (the default), ``"pred"`` the pixels predicted as ``k``, or a boolean
  array ``[H, W]`` / ``[N, H, W]`` at the output's size (e.g. the ground-truth mask);
* ``Pixel(k, y, x)``: logit ``k`` at one output pixel;
* a list with one of these per sample.

Maps (R-11.2) come as :class:`AttributionMap`: ``native`` at the point's own resolution and
``upsampled`` to the input size (``interpolation`` says how). Channel reductions: saliency and
SmoothGrad average ``|gradient|`` over channels; integrated gradients sum the attribution over
channels (so an input map sums to ``f(x) - f(baseline)``); Grad-CAM is
``sum_c mean_hw(grad_c) * A_c`` with ``relu`` applied only when asked (``relu=True`` is the
paper's map; Captum's ``LayerGradCam`` default is ``relu_attributions=False``); LayerCAM (Jiang
et al. 2021) weights every position by its own positive gradient, ``sum_c relu(grad_c) * A_c``
(then ``relu``), which keeps the fine detail of early, high-resolution points that Grad-CAM's
spatially averaged weights wash out (R-11.2).

Examples:
    >>> import featlab.testing as ft
    >>> net = ft.TinyResNet()
    >>> maps = grad_cam(net, ft.random_images(2, 32), target=3, points=["layer1.0", "layer1.1"])
    >>> [(k, tuple(m.native.shape), tuple(m.upsampled.shape)) for k, m in maps.items()]
    [('layer1.0', (2, 16, 16), (2, 32, 32)), ('layer1.1', (2, 8, 8), (2, 32, 32))]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featlab.errors import ConfigError

__all__ = ["ClassLogit", "ClassRegion", "Pixel", "AttributionMap", "gradients", "saliency",
           "smoothgrad", "integrated_gradients", "grad_cam", "layer_cam", "attribute", "METHODS",
           "resolve_points", "INPUT"]

INPUT = "input"
METHODS = ("gradcam", "layercam", "saliency", "smoothgrad", "ig")
CAM_METHODS = ("gradcam", "layercam")  # the methods with a final ``relu`` switch


# ---- targets ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClassLogit:
    """Logit ``cls`` of a classifier output ``[N, K]``."""

    cls: int


@dataclass(frozen=True, eq=False)
class ClassRegion:
    """Sum of logit ``cls`` of a segmentation output ``[N, K, H, W]`` over a region.

    ``mask``: None (every pixel, the default), ``"pred"`` (pixels whose argmax is ``cls``), or
    a boolean ``[H, W]`` / ``[N, H, W]`` array or tensor at the output's spatial size.
    """

    cls: int
    mask: Any = None


@dataclass(frozen=True)
class Pixel:
    """Logit ``cls`` of a segmentation output at pixel ``(y, x)``."""

    cls: int
    y: int
    x: int


def _objective(output: torch.Tensor, target: Any) -> torch.Tensor:
    """The scalar objective summed over the batch."""
    if not isinstance(output, torch.Tensor) or output.ndim not in (2, 4):
        shape = list(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ConfigError(f"the model output must be [N, K] logits or [N, K, H, W] segmentation "
                          f"logits; got {shape}. Fix: wrap the model so it returns one tensor.")
    n = output.shape[0]
    targets = list(target) if isinstance(target, (list, tuple)) else [target] * n
    if len(targets) != n:
        raise ConfigError(f"a list of targets must have one entry per sample ({n}); got "
                          f"{len(targets)}. Fix: pass one target, or one per sample.")
    total = output.new_zeros(())
    for i, t in enumerate(targets):
        if isinstance(t, torch.Tensor) and t.ndim == 0:
            t = int(t)
        if isinstance(t, int) and not isinstance(t, bool):
            t = ClassLogit(t) if output.ndim == 2 else ClassRegion(t)
        k = getattr(t, "cls", None)
        if not isinstance(t, (ClassLogit, ClassRegion, Pixel)) or not isinstance(k, int) \
                or not 0 <= k < output.shape[1]:
            raise ConfigError(f"target must be a class index in [0, {output.shape[1]}), "
                              f"ClassLogit, ClassRegion or Pixel; got {t!r}. Fix: e.g. "
                              "target=3 or ClassRegion(3, mask).")
        if isinstance(t, ClassLogit):
            if output.ndim != 2:
                raise ConfigError("ClassLogit needs a classifier output [N, K]; got "
                                  f"{list(output.shape)}. Fix: use ClassRegion or Pixel.")
            total = total + output[i, k]
        elif output.ndim != 4:
            raise ConfigError(f"{type(t).__name__} needs a segmentation output [N, K, H, W]; "
                              f"got {list(output.shape)}. Fix: use a class index.")
        elif isinstance(t, Pixel):
            total = total + output[i, k, t.y, t.x]
        else:
            total = total + _region_sum(output, i, k, t.mask)
    return total


def _region_sum(output: torch.Tensor, i: int, k: int, mask: Any) -> torch.Tensor:
    logit = output[i, k]
    if mask is None:
        return logit.sum()
    if isinstance(mask, str):
        if mask != "pred":
            raise ConfigError(f"ClassRegion mask must be None, 'pred' or a boolean array; got "
                              f"{mask!r}. Fix: pass the ground-truth mask as an array.")
        region = output[i].argmax(0) == k
    else:
        region = torch.as_tensor(mask, device=output.device)
        region = region[i] if region.ndim == 3 else region
        if tuple(region.shape) != tuple(logit.shape):
            raise ConfigError(f"ClassRegion mask must match the output size {list(logit.shape)}; "
                              f"got {list(region.shape)}. Fix: resize the mask (nearest) to the "
                              "output size first.")
    return (logit * region.to(logit.dtype)).sum()


# ---- results ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttributionMap:
    """One method's maps at one point.

    Attributes:
        point: point name (``"input"`` for the network input).
        method: ``"gradcam"``, ``"saliency"``, ``"smoothgrad"`` or ``"ig"``.
        native: ``[N, h, w]`` at the point's resolution.
        upsampled: ``[N, H, W]`` at the input size.
        interpolation: how ``upsampled`` was made (``"bilinear"``, align_corners=False).
        relu: whether a ReLU was applied to the map (Grad-CAM), None where it does not apply.
    """

    point: str
    method: str
    native: torch.Tensor
    upsampled: torch.Tensor
    interpolation: str = "bilinear"
    relu: bool | None = None


def _maps(method: str, native: dict[str, torch.Tensor], size: tuple[int, int],
          relu: bool | None = None) -> dict[str, AttributionMap]:
    out = {}
    for name, m in native.items():
        up = m if tuple(m.shape[-2:]) == tuple(size) else F.interpolate(
            m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        out[name] = AttributionMap(name, method, m, up, "bilinear", relu)
    return out


# ---- the one pass ----------------------------------------------------------------------------
def resolve_points(model: nn.Module, points: Any, input_size: tuple[int, int]) -> list:
    """Point names / records chosen by ``points`` (``"input"`` kept as is, in place)."""
    from featlab.points import SkipPoint, select_points, skip_points

    if points is None:
        points = "all"
    items = [points] if isinstance(points, (str, SkipPoint)) else list(points)
    items = [p for i in items for p in ([s.strip() for s in i.split(",") if s.strip()]
                                        if isinstance(i, str) else [i])]
    modules = dict(model.named_modules())
    found: list = []
    discovered = None
    for item in items:
        if item == INPUT or isinstance(item, SkipPoint) or item in modules:
            found.append(item)
            continue
        if discovered is None:
            discovered = skip_points(model, input_size=tuple(input_size))
        found += select_points(discovered, item)
    return found


def _name(p: Any) -> str:
    return p if isinstance(p, str) else p.name


def gradients(model: nn.Module, x: torch.Tensor, target: Any, points: Any = "stages", *,
              max_batch: int | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Activation and gradient of the objective at every point, from one forward + backward.

    Args:
        model: the network (run in eval mode inside the call, modes restored afterwards).
        x: input batch ``[N, 3, H, W]`` (already normalised as the weights expect).
        target: see the module docstring.
        points: skip-point selection, names, ``SkipPoint`` records, and/or ``"input"``.
        max_batch: run at most this many samples per pass (R-11.4).

    Returns:
        ``{name: (activation, gradient)}`` detached, in the order of ``points``.
    """
    from featlab.capture import capture

    selected = resolve_points(model, points, tuple(x.shape[-2:]))
    if not selected:
        raise ConfigError("`points` must select at least one point; got an empty selection.")
    layer = [p for p in selected if p != INPUT]
    names = [_name(p) for p in selected]
    chunks = []
    step = max_batch or len(x)
    targets = list(target) if isinstance(target, (list, tuple)) else None
    for start in range(0, len(x), step):
        xb = x[start:start + step].detach().clone()
        tb = target if targets is None else targets[start:start + step]
        if INPUT in names:
            xb.requires_grad_(True)
        with torch.enable_grad():
            if layer:
                with capture(model, layer, detach=False) as acts:
                    score = _objective(model(xb), tb)
                    values = [xb if n == INPUT else acts[n] for n in names]
            else:
                with _eval(model):
                    score = _objective(model(xb), tb)
                values = [xb]
            grads = torch.autograd.grad(score, values, allow_unused=True)
        chunks.append([(v.detach(), torch.zeros_like(v) if g is None else g.detach())
                       for v, g in zip(values, grads)])
    return {n: (torch.cat([c[i][0] for c in chunks]), torch.cat([c[i][1] for c in chunks]))
            for i, n in enumerate(names)}


class _eval:
    """Eval mode inside the block, every module's flag restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for m, training in self.modes:
            m.training = training


# ---- methods ---------------------------------------------------------------------------------
def grad_cam(model: nn.Module, x: torch.Tensor, target: Any, points: Any = "stages", *,
             relu: bool = True, max_batch: int | None = None) -> dict[str, AttributionMap]:
    """Grad-CAM at every point from one forward and one backward pass.

    ``map = sum_c mean_hw(dS/dA_c) * A_c``, then ``relu`` when asked. With ``relu=False`` it
    equals Captum's ``LayerGradCam(model, layer).attribute(x, target)``.
    """
    return _cam("gradcam", lambda g: g.mean(dim=(2, 3), keepdim=True), model, x, target, points,
                relu, max_batch)


def layer_cam(model: nn.Module, x: torch.Tensor, target: Any, points: Any = "stages", *,
              relu: bool = True, max_batch: int | None = None) -> dict[str, AttributionMap]:
    """LayerCAM at every point from one forward and one backward pass.

    ``map = sum_c relu(dS/dA_c) * A_c`` (element-wise weights), then ``relu`` when asked (the
    paper's map). At points with non-negative activations (after a ReLU) it equals
    ``relu(sum_c relu(grad_c * A_c))``.
    """
    return _cam("layercam", F.relu, model, x, target, points, relu, max_batch)


def _cam(method: str, weights, model: nn.Module, x: torch.Tensor, target: Any, points: Any,
         relu: bool, max_batch: int | None) -> dict[str, AttributionMap]:
    """``sum_c weights(grad)_c * A_c`` per point, then ``relu`` when asked."""
    if any(p == INPUT for p in _as_list(points)):
        raise ConfigError(f"{method} needs feature maps; got the point 'input'. Fix: use "
                          "method 'saliency' for input-level maps.")
    native = {}
    for name, (a, g) in gradients(model, x, target, points, max_batch=max_batch).items():
        cam = (weights(g) * a).sum(1)
        native[name] = F.relu(cam) if relu else cam
    return _maps(method, native, tuple(x.shape[-2:]), relu)


def saliency(model: nn.Module, x: torch.Tensor, target: Any, points: Any = ("input",), *,
             max_batch: int | None = None) -> dict[str, AttributionMap]:
    """Gradient magnitude ``mean_c |dS/dA_c|`` at every point (``"input"``: Simonyan et al.).

    Before the channel mean, the input gradient equals Captum's ``Saliency`` (abs=True).
    """
    grads = gradients(model, x, target, points, max_batch=max_batch)
    return _maps("saliency", {n: g.abs().mean(1) for n, (_, g) in grads.items()},
                 tuple(x.shape[-2:]))


def smoothgrad(model: nn.Module, x: torch.Tensor, target: Any, points: Any = ("input",), *,
               n_samples: int = 16, stdev: float = 0.15, seed: int = 0, first: int = 0,
               max_batch: int | None = None) -> dict[str, AttributionMap]:
    """SmoothGrad: saliency averaged over ``n_samples`` copies of ``x`` plus Gaussian noise.

    The noise has standard deviation ``stdev * (x.max() - x.min())`` per sample (Smilkov et al.
    2017's relative noise level). Each sample draws its own from a generator seeded with
    ``np.random.SeedSequence([seed, first + i])`` (``first``: the index of ``x``'s first sample
    in its data set), so a sample's map does not depend on the batch it came in.
    """
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ConfigError(f"`n_samples` must be an int >= 1; got {n_samples!r}.")
    gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([seed, first + i])
                                              .generate_state(1, np.uint64)[0]))
            for i in range(len(x))]
    span = (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    total: dict[str, torch.Tensor] = {}
    for _ in range(n_samples):
        noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(
            x.device, x.dtype) * stdev * span
        for n, (_, grad) in gradients(model, x + noise, target, points,
                                      max_batch=max_batch).items():
            total[n] = total.get(n, 0) + grad.abs().mean(1)
    return _maps("smoothgrad", {n: t / n_samples for n, t in total.items()},
                 tuple(x.shape[-2:]))


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: Any,
                         points: Any = ("input",), *, baseline: float | torch.Tensor = 0.0,
                         n_steps: int = 32, method: str = "riemann_middle",
                         max_batch: int | None = None) -> dict[str, AttributionMap]:
    """Integrated gradients along the straight input path from ``baseline`` to ``x``.

    At a point the attribution is ``(A(x) - A(baseline)) * mean_alpha dS/dA(path(alpha))``,
    summed over channels: gradients at the point along the *input* path, so every point comes
    from the same ``n_steps`` passes (Captum's ``LayerIntegratedGradients`` interpolates in
    the layer's own space instead, one point at a time). At ``"input"`` this is Captum's
    ``IntegratedGradients`` with the same ``method``, summed over channels.
    """
    alphas = _alphas(method, n_steps)
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device).expand_as(x)
    grads: dict[str, torch.Tensor] = {}
    for a in alphas:
        for n, (_, grad) in gradients(model, base + a * (x - base), target, points,
                                      max_batch=max_batch).items():
            grads[n] = grads.get(n, 0) + grad / len(alphas)
    ends = {}
    for end in (x, base):
        ends[len(ends)] = _activations(model, end, list(grads), max_batch)
    native = {n: ((ends[0][n] - ends[1][n]) * g).sum(1) for n, g in grads.items()}
    return _maps("ig", native, tuple(x.shape[-2:]))


def _activations(model: nn.Module, x: torch.Tensor, names: list[str], max_batch: int | None
                 ) -> dict[str, torch.Tensor]:
    from featlab.capture import capture

    layer = [n for n in names if n != INPUT]
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    step = max_batch or len(x)
    with torch.no_grad():
        for start in range(0, len(x), step):
            xb = x[start:start + step]
            if layer:
                with capture(model, layer) as acts:
                    model(xb)
                for n in layer:
                    out[n].append(acts[n])
            if INPUT in out:
                out[INPUT].append(xb)
    return {n: torch.cat(v) for n, v in out.items()}


def _alphas(method: str, n: int) -> list[float]:
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"`n_steps` must be an int >= 1; got {n!r}.")
    grids = {"riemann_middle": [(i + 0.5) / n for i in range(n)],
             "riemann_left": [i / n for i in range(n)],
             "riemann_right": [(i + 1) / n for i in range(n)]}
    if method not in grids:
        raise ConfigError(f"`method` of integrated_gradients must be one of {sorted(grids)}; "
                          f"got {method!r}.")
    return grids[method]


def attribute(model: nn.Module, x: torch.Tensor, target: Any, points: Any = "stages", *,
              method: str = "gradcam", relu: bool = True, seed: int = 0, first: int = 0,
              max_batch: int | None = None, **options: Any) -> dict[str, AttributionMap]:
    """Dispatch to one method by name (``METHODS``); ``options`` go to that method (``seed``
    and ``first``, the index of ``x``'s first sample, to ``smoothgrad``'s per-sample noise)."""
    if method == "gradcam":
        return grad_cam(model, x, target, points, relu=relu, max_batch=max_batch, **options)
    if method == "layercam":
        return layer_cam(model, x, target, points, relu=relu, max_batch=max_batch, **options)
    if method == "saliency":
        return saliency(model, x, target, points, max_batch=max_batch, **options)
    if method == "smoothgrad":
        return smoothgrad(model, x, target, points, seed=seed, first=first, max_batch=max_batch,
                          **options)
    if method == "ig":
        return integrated_gradients(model, x, target, points, max_batch=max_batch, **options)
    raise ConfigError(f"saliency method must be one of {', '.join(METHODS)}; got {method!r}. "
                      "Fix: e.g. --method gradcam.")


def _as_list(points: Any) -> Sequence:
    if isinstance(points, (list, tuple)):
        return list(points)
    return [p.strip() for p in points.split(",")] if isinstance(points, str) else [points]
