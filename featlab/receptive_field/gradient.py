"""The empirical cross-check of the arithmetic: the gradient support of one output unit.

:func:`gradient_receptive_field` linearises a copy of the model (positive constant weights, no
biases, norms and activations dropped, max-pools averaged) so that the gradient of one unit is
non-zero exactly on the input pixels that unit sees.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
from torch import nn

from featlab.errors import ConfigError, SkipPointNotFiredError, SkipPointNotFoundError, did_you_mean
from featlab.receptive_field.rules import _POINTWISE

__all__ = ["EmpiricalRF", "gradient_receptive_field"]


@dataclass(frozen=True)
class EmpiricalRF:
    """Support of the input gradient of one output unit (inclusive pixel bounds, (H, W) pairs).

    Attributes:
        unit: the output unit (row, column) whose gradient was taken.
        start: first input row / column with non-zero gradient.
        stop: last input row / column with non-zero gradient (inclusive).
    """

    unit: tuple[int, int]
    start: tuple[int, int]
    stop: tuple[int, int]

    @property
    def size(self) -> tuple[int, int]:
        """Extent of the support, (H, W)."""
        return (self.stop[0] - self.start[0] + 1, self.stop[1] - self.start[1] + 1)


class _Stop(Exception):
    """Raised by the capture hook to skip the rest of the forward pass."""


_SE = re.compile(r"squeeze|excit|^se(module|layer|block)?$", re.IGNORECASE)
_DROPPED = tuple(t for t in _POINTWISE if isinstance(t, type)) + (
    nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


def _linearise(model: nn.Module) -> nn.Module:
    """A float64 copy that is linear with positive weights, so gradient support = geometry."""
    net = copy.deepcopy(model).double().eval()
    for parent in list(net.modules()):
        for child_name, child in list(parent.named_children()):
            cls = type(child).__name__
            replacement: nn.Module | None = None
            if isinstance(child, _DROPPED) or _SE.search(cls) or cls == "FrozenBatchNorm2d":
                # norms and activations drop out; squeeze-excitation gates become constant (1)
                replacement = nn.Identity()
            elif isinstance(child, nn.MaxPool2d) and child.dilation in (1, (1, 1)):
                # a max over equal values routes the gradient to one pixel: use the mean instead
                replacement = nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                           ceil_mode=child.ceil_mode)
            elif isinstance(child, nn.AdaptiveMaxPool2d):
                replacement = nn.AdaptiveAvgPool2d(child.output_size)
            if replacement is not None:
                setattr(parent, child_name, replacement)
    with torch.no_grad():
        for module in net.modules():
            own = dict(module.named_parameters(recurse=False))
            for pname, param in own.items():
                if pname == "bias":
                    param.zero_()
                elif pname == "weight" and param.dim() >= 2:
                    param.fill_(1.0 / max(1, param[0].numel()))   # each unit averages its inputs
                else:
                    param.fill_(1.0)                               # e.g. ConvNeXt layer scale
    return net


def gradient_receptive_field(model: nn.Module, module_name: str, input_size: int | tuple[int, int]
                             = 224, *, unit: tuple[int, int] | None = None,
                             in_channels: int = 3) -> EmpiricalRF:
    """Measure a module's receptive field as the gradient support of one output unit.

    Works on a deep copy made linear and positive (conv / linear weights positive constants,
    biases 0, norms and activations -> Identity, max-pool -> average pool of the same geometry,
    squeeze-excitation modules -> Identity so their gates are constant, eval mode so dropout is
    off), in float64, so no path cancels or underflows: the support is the geometric field
    clipped to the image. The model itself is not touched. Cost: one forward up to the module
    and one backward at ``input_size``.

    Args:
        model: the network.
        module_name: a path of ``model.named_modules()``; its output must be ``[N, C, H, W]``.
        input_size: side, or (H, W), of the all-ones input.
        unit: output unit (row, column); default the centre ``(H // 2, W // 2)``.
        in_channels: input channels.

    Returns:
        The support's bounds. Theory predicts, for unit u on axis H,
        ``[u*S - P, u*S - P + r - 1]`` clipped to the image.

    Examples:
        >>> import featlab.testing as ft
        >>> gradient_receptive_field(ft.DilatedNet(), "convs", 32).size
        (15, 15)
    """
    modules = dict(model.named_modules())
    if module_name not in modules or not module_name:
        raise SkipPointNotFoundError(
            f"`module_name` must name a module of {type(model).__name__}; got {module_name!r}."
            f"{did_you_mean(module_name, [n for n in modules if n])} Fix: see "
            "[n for n, _ in model.named_modules()] or `featlab points MODEL`.")
    h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    net = _linearise(model)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inputs: object, output: object) -> None:
        captured.append(output)
        raise _Stop

    place = next(net.parameters(), torch.empty(0)).device  # the model's own device
    x = torch.ones(1, in_channels, h, w, dtype=torch.float64, device=place, requires_grad=True)
    handle = dict(net.named_modules())[module_name].register_forward_hook(hook)
    try:
        with torch.enable_grad():
            try:
                net(x)
            except _Stop:
                pass
    finally:
        handle.remove()
    if not captured:
        raise SkipPointNotFiredError(f"`module_name` must name a module that runs in forward; "
                                     f"{module_name!r} did not run. Fix: pick a module on the "
                                     "path from input to output.")
    out = captured[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        raise ConfigError(f"`module_name` must name a module returning [N, C, H, W]; "
                          f"{module_name!r} returned {type(out).__name__} "
                          f"{tuple(getattr(out, 'shape', ()))}. Fix: pick a feature-map module.")
    uh, uw = unit if unit is not None else (out.shape[2] // 2, out.shape[3] // 2)
    (grad,) = torch.autograd.grad(out[0, :, uh, uw].sum(), x)
    support = grad[0].abs().sum(0) > 0
    rows = support.any(1).nonzero().flatten()
    cols = support.any(0).nonzero().flatten()
    if rows.numel() == 0:
        raise ConfigError(f"unit {(uh, uw)} of {module_name!r} has no input gradient; expected a "
                          "unit that depends on the input. Fix: choose another unit.")
    return EmpiricalRF((int(uh), int(uw)), (int(rows[0]), int(cols[0])),
                       (int(rows[-1]), int(cols[-1])))
