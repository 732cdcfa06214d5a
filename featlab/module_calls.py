"""Every module of one forward, with what a hook on it would meet (field notes R-1.4).

:func:`featlab.skip_points` lists the places worth a decoder's skip connection; a user capturing
any other module (``featlab.capture(model, ["layer1.0.bn2"])``) needs to know two things about
it first: how often it runs per forward (a reused ``relu`` raises ``ReusedModuleError`` unless
``on_reuse="all"``), and whether a later in-place op changes its output (``bn1`` before
``ReLU(inplace=True)``, ``bn2`` before ``out += identity``): a hook that kept a reference would
see the changed tensor, which is why featlab's hooks copy. The second is read from the output
tensor's version counter, which every in-place op bumps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["ModuleCall", "module_calls"]


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
