"""What hooks alone measure: every module of one forward (field notes R-1.4), and skip-point
records of named modules where ``torch.fx`` cannot trace.

:func:`featlab.skip_points` lists the places worth a decoder's skip connection; a user capturing
any other module (``featlab.capture(model, ["layer1.0.bn2"])``) needs to know two things about
it first: how often it runs per forward (a reused ``relu`` raises ``ReusedModuleError`` unless
``on_reuse="all"``), and whether a later in-place op changes its output (``bn1`` before
``ReLU(inplace=True)``, ``bn2`` before ``out += identity``): a hook that kept a reference would
see the changed tensor, which is why featlab's hooks copy. The second is read from the output
tensor's version counter, which every in-place op bumps.

:func:`hooked_points` measures named modules the same way, as :class:`~featlab.points.SkipPoint`
records, for models ``torch.fx`` cannot trace (extraction at explicit names uses it then).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from featlab.errors import ConfigError

if TYPE_CHECKING:
    from featlab.points import SkipPoint

__all__ = ["ModuleCall", "module_calls", "hooked_points"]


@dataclass(frozen=True)
class ModuleCall:
    """One module of a forward.

    Attributes:
        name: qualified module name (what ``featlab.capture`` takes).
        type: its class name.
        calls: how many times it ran in one forward.
        shape: its first call's output shape (batch 1), None for a non-tensor output.
        changed_in_place: a later in-place op changed that output during the forward.
    """

    name: str
    type: str
    calls: int
    shape: tuple[int, ...] | None
    changed_in_place: bool

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": None if self.shape is None else list(self.shape)}


def module_calls(model: nn.Module, input_size: int | Sequence[int] = 224, *,
                 in_channels: int = 3) -> list[ModuleCall]:
    """The submodules that run in one forward of a ``[1, in_channels, H, W]`` input, in the
    order of their first calls (eval mode, no gradients; the model's modes are restored).

    Examples:
        >>> import featlab.testing as ft
        >>> calls = {c.name: c for c in module_calls(ft.TinyResNet(), 32)}
        >>> calls["layer1.0.relu"].calls, calls["bn1"].changed_in_place  # reused; ReLU in place
        (2, True)
        >>> calls["layer1.0.bn2"].changed_in_place, calls["layer1.0"].changed_in_place
        (True, False)
    """
    from featlab.points import unwrap_model

    root = unwrap_model(model)
    h, w = (input_size, input_size) if isinstance(input_size, int) else map(int, input_size)
    param = next(root.parameters(), None)
    x = torch.zeros(1, in_channels, h, w, device=None if param is None else param.device,
                    dtype=torch.float32 if param is None else param.dtype)
    seen: dict[str, list] = {}  # name -> [type, calls, output, its version then]
    handles = []

    def hook(name: str):
        def record(module: nn.Module, args: object, output: object) -> None:
            if name in seen:
                seen[name][1] += 1
            else:
                tensor = output if isinstance(output, torch.Tensor) else None
                seen[name] = [type(module).__name__, 1, tensor,
                              None if tensor is None else tensor._version]
        return record

    modes = [(m, m.training) for m in root.modules()]
    try:
        for name, module in root.named_modules():
            if name:
                handles.append(module.register_forward_hook(hook(name)))
        root.eval()
        # not in inference mode, even inside a caller's: its tensors have no version counter
        with torch.inference_mode(False), torch.no_grad():
            x = x.clone()  # a normal tensor, also when made under the caller's inference mode
            root(x)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
    return [ModuleCall(name, kind, calls, None if out is None else tuple(out.shape),
                       out is not None and out._version != version)
            for name, (kind, calls, out, version) in seen.items()]


UNTRACED = "unknown: the model could not be traced (measured by hooks)"


def hooked_points(model: nn.Module, names: Sequence[str], input_size: int | tuple[int, int],
                  *, in_channels: int = 3) -> list[SkipPoint]:
    """:class:`SkipPoint` records of named modules, measured with hooks only, for models that
    ``torch.fx`` cannot trace (data-dependent control flow): the output of each module at the
    input size and at a larger one gives channels, size and stride; the receptive field is
    unknown (``rf_status`` says why). Each module must run once per forward and return a 4-D map.

    Examples:
        >>> import featlab.testing as ft
        >>> p = hooked_points(ft.TinyResNet(), ["layer1.1"], 32)[0]
        >>> p.channels, p.size, p.stride, p.rf_size
        (16, (8, 8), 4, None)
    """
    from featlab.capture import capture
    from featlab.points import SkipPoint, _pair, unwrap_model

    root = unwrap_model(model)
    size = _pair(input_size)
    param = next(root.parameters(), torch.zeros(()))
    delta = 64  # a multiple of every usual stride (up to 64), so the growth is exact
    shapes, ran = [], []
    for h, w in (size, (size[0] + delta, size[1] + delta)):
        x = torch.zeros(1, in_channels, h, w, device=param.device, dtype=param.dtype)
        with capture(root, list(names)) as acts:  # eval mode, no graph, hooks always removed
            order = [root.get_submodule(n).register_forward_hook(
                lambda *_, n=n: ran.append(n)) for n in names]
            try:
                root(x)
            finally:
                for handle in order:
                    handle.remove()
        shapes.append({n: tuple(acts[n].shape) for n in names})
    points = []
    for name in sorted(names, key=ran.index):  # execution order, as skip_points gives
        # (extraction ends each forward after the last)
        first, second = shapes[0][name], shapes[1][name]
        grown = second[2] - first[2] if len(first) == len(second) == 4 else 0
        if grown <= 0 or delta % grown:
            raise ConfigError(f"`points` of an untraced model must be modules returning a "
                              f"feature map whose size follows the input; {name!r} returned "
                              f"{list(first)} at {size[0]} px and {list(second)} at "
                              f"{size[0] + delta} px. Fix: name a convolutional stage.")
        points.append(SkipPoint(name, len(points), name, first[1], first[2:], delta // grown,
                                None, None, None, UNTRACED))
    return points
