"""Capture intermediate activations with forward hooks that copy, count and always go away.

``capture(model, points)`` returns a :class:`Recorder`: a read-only mapping from point name to
the tensor that point's module returned in the latest forward of ``model``. Three things make
hook-based capture silently wrong on real backbones, and the recorder guards against each
(field notes R-1.x):

* in-place ops after the module (``out += identity``, ``ReLU(inplace=True)``) rewrite the output
  tensor after the hook ran, so every hook stores a *copy* taken inside the hook;
* a module called several times per forward (torchvision's ResNet blocks reuse one ``relu``)
  fires its hook several times, so calls are counted per forward and reuse is an error unless
  ``on_reuse="all"`` asks for every call (``"name#0"``, ``"name#1"``, ...);
* a module returning a tuple or dict needs an explicit selector (``"heads[0]"``,
  ``"aux['out']"``); featlab never guesses an element.

A forward is delimited by a pre-hook and a hook on the model itself: the pre-hook resets the
counts (and checks eval mode), the hook validates the counts and publishes the values, so the
mapping always holds exactly one complete forward.

Wrapped models: ``DistributedDataParallel`` and single-device ``DataParallel`` are unwrapped
(names resolve against ``.module``; a leading ``"module."`` is accepted). Multi-device
``DataParallel`` replicas share the hook dicts and call them from several threads at once, and
hooks inside a ``torch.compile``d module are not reliably called, so both raise a
:class:`~featlab.errors.ConfigError` that says what to capture instead.

Examples:
    >>> import featlab, featlab.testing as ft
    >>> net = ft.TinyResNet()
    >>> with featlab.capture(net, ["layer1.0", "layer1.0.bn2"]) as acts:
    ...     _ = net(ft.random_images(2, 32))
    >>> sorted(acts), tuple(acts["layer1.0"].shape)
    (['layer1.0', 'layer1.0.bn2'], (2, 8, 16, 16))
"""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from featlab._targets import not_a_tensor, replace, resolve, select, unwrap
from featlab.errors import (ConfigError, ModelModeError, ReusedModuleError,
                            SkipPointNotFiredError, did_you_mean)

__all__ = ["capture", "Recorder"]

log = logging.getLogger("featlab")

_ON_REUSE = ("error", "all")


class _Forward:
    """Mutable state of one forward in progress (per module call counts, copies per target)."""

    __slots__ = ("counts", "values", "sync")

    def __init__(self, n_modules: int, n_targets: int):
        self.counts = [0] * n_modules
        self.values: list[list[torch.Tensor]] = [[] for _ in range(n_targets)]
        self.sync: set[torch.device] = set()


def capture(model: nn.Module, points: Any = None, *, detach: bool = True,
            device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
            on_reuse: str = "error", eval: bool = True) -> Recorder:  # noqa: A002 (contract name)
    """Record what chosen modules of ``model`` return, inside a ``with`` block.

    Args:
        model: the network (``DataParallel`` on one device and ``DistributedDataParallel`` are
            unwrapped; ``torch.compile`` output is refused: capture ``model._orig_mod``).
        points: ``None`` for all skip points of the model; a module name (``"layer1.0.bn2"``,
            any module, optionally with a selector ``"heads[0]"`` / ``"heads['out']"``; a name
            ending in ``[<int>]`` is always a selector); a ``SkipPoint``; a selection over the
            skip points (``"stages"``, ``"all"``, a glob such as ``"layer3.*"``,
            ``"re:<regex>"``); or a list of these (a comma-separated string is such a list).
            Keys are the names as written (``SkipPoint.name`` for points and selections), in
            request order; selections resolve with :func:`featlab.points.skip_points` at its
            default input size, so pass the point list itself in tight loops.
        detach: store ``detach().clone()`` copies (default). ``False`` keeps the autograd graph:
            the stored tensor is a clone of the real output and the model continues with a
            clone of *it*, so ``torch.autograd.grad(score, acts[name])`` is the gradient at the
            module output and later in-place ops still cannot change the stored value.
        device: copy captured tensors to this device (``"cpu"`` from CUDA copies asynchronously
            into pinned memory and synchronises once at the end of the forward).
        dtype: cast captured tensors to this floating dtype (e.g. ``"float16"``). Not allowed
            with ``detach=False`` (the cast would change what the model computes).
        on_reuse: ``"error"`` raises :class:`~featlab.errors.ReusedModuleError` when a captured
            module runs more than once per forward; ``"all"`` stores every call of such a module
            as ``"name#0"``, ``"name#1"``, ... (modules that run once keep their plain name).
        eval: put the model in eval mode inside the block, restore every module's ``training``
            flag on exit, and raise :class:`~featlab.errors.ModelModeError` at the next forward
            if anything switched a module back to training mode inside the block.

    Returns:
        A :class:`Recorder`; hooks exist only between ``__enter__`` and ``__exit__``.

    Examples:
        >>> import featlab.testing as ft
        >>> net = ft.TinyCNN()
        >>> with capture(net, "features.2", dtype="float16") as acts:
        ...     _ = net(ft.random_images(1, 16))
        >>> acts["features.2"].dtype, tuple(acts["features.2"].shape)
        (torch.float16, (1, 8, 8, 8))
    """
    return Recorder(model, points, detach=detach, device=device, dtype=dtype,
                    on_reuse=on_reuse, eval=eval)


class Recorder(Mapping[str, torch.Tensor]):
    """Read-only mapping ``point name -> tensor`` of the latest complete forward; a context manager.

    Points are resolved when the recorder is made (so a misspelt name fails before any work);
    hooks are registered by ``__enter__`` and removed by ``__exit__`` whatever happens in the
    block (errors, ``KeyboardInterrupt``). The values stay readable after the block. See
    :func:`capture` for the arguments.

    Attributes:
        names: the requested point names, in request order (keys of the mapping, except that a
            reused module under ``on_reuse="all"`` appears as ``"name#0"``, ``"name#1"``, ...).
        calls: ``name -> number of calls`` of each point's module in the latest forward.

    Examples:
        >>> import featlab.testing as ft
        >>> net = ft.TinyResNet()  # its blocks reuse one in-place ReLU, as torchvision's do
        >>> with Recorder(net, ["layer1.0.relu", "layer1.0"], on_reuse="all") as acts:
        ...     _ = net(ft.random_images(1, 16))
        >>> list(acts), acts.calls
        (['layer1.0.relu#0', 'layer1.0.relu#1', 'layer1.0'], {'layer1.0.relu': 2, 'layer1.0': 1})
        >>> bool((acts["layer1.0.relu#1"] == acts["layer1.0"]).all())  # 2nd call: block output
        True
    """

    def __init__(self, model: nn.Module, points: Any = None, *, detach: bool = True,
                 device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                 on_reuse: str = "error", eval: bool = True):  # noqa: A002
        for flag, value in (("detach", detach), ("eval", eval)):
            if not isinstance(value, bool):
                raise ConfigError(f"`{flag}` of capture must be True or False; got {value!r}.")
        if on_reuse not in _ON_REUSE:
            raise ConfigError(f"`on_reuse` of capture must be one of {_ON_REUSE}; got "
                              f"{on_reuse!r}. Fix: 'all' stores every call as 'name#0', 'name#1'.")
        self._device = _as_device(device)
        self._dtype = _as_dtype(dtype)
        if not detach and self._dtype is not None:
            raise ConfigError(f"`dtype` of capture must be None when detach=False; got "
                              f"{self._dtype}. Keeping the graph through a cast would change what "
                              "the model computes. Fix: cast the captured tensors afterwards.")
        self._model = model
        self._root, prefix = unwrap(model)
        modules = dict(self._root.named_modules())
        self._targets = resolve(self._root, modules, points, prefix)
        order = list(dict.fromkeys(t.module for t in self._targets))
        # one hook per module, serving every target (selector) on that module
        self._hooked = [(name, modules[name], tuple(i for i, t in enumerate(self._targets)
                                                    if t.module == name)) for name in order]
        self._slot_of = [order.index(t.module) for t in self._targets]
        self._keep_graph = not detach
        self._keep_all = on_reuse == "all"
        self._eval = eval
        self._copy = self._make_copy()
        self._values: dict[str, torch.Tensor] = {}
        self._calls: dict[str, int] = {}
        self._forward: _Forward | None = None
        self._handles: list[Any] = []
        self._modes: list[tuple[nn.Module, bool]] | None = None

    # -- mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: str) -> torch.Tensor:
        try:
            return self._values[key]
        except KeyError:
            raise KeyError(self._missing(key)) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, key: object) -> bool:
        return key in self._values

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.key for t in self._targets)

    @property
    def calls(self) -> dict[str, int]:
        return dict(self._calls)

    def __repr__(self) -> str:
        return (f"Recorder({type(self._root).__name__}, points={list(self.names)}, "
                f"captured={list(self._values)})")

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> Recorder:
        if self._handles or self._modes is not None:
            raise ConfigError("A Recorder must be entered once at a time; got a nested `with` "
                              "on the same recorder. Fix: make a second one with capture(...).")
        self._values, self._calls, self._forward = {}, {}, None
        try:
            if self._eval:
                self._modes = [(m, m.training) for m in self._model.modules()]
                self._model.eval()
            root = self._root
            self._handles.append(root.register_forward_pre_hook(self._begin, prepend=True))
            for slot, (name, module, targets) in enumerate(self._hooked):
                self._handles.append(module.register_forward_hook(
                    self._make_hook(slot, name, targets)))
            # registered last so that it runs after a hook on the root module itself
            self._handles.append(root.register_forward_hook(self._end))
            log.debug("capture: %d hooks on %s", len(self._hooked), type(root).__name__)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        try:
            while self._handles:
                self._handles.pop().remove()
        finally:
            modes, self._modes, self._forward = self._modes, None, None
            for module, training in modes or ():
                module.training = training

    # -- hooks ---------------------------------------------------------------------------------
    def _begin(self, module: nn.Module, args: Any) -> None:
        self._values, self._calls, self._forward = {}, {}, None
        if self._eval:
            training = [m for m, _ in self._modes or () if m.training]
            if training:
                names = {id(m): n for n, m in self._model.named_modules()}
                shown = ", ".join(repr(names.get(id(m), "?")) for m in training[:3])
                more = ", ..." if len(training) > 3 else ""
                raise ModelModeError(
                    f"every module must be in eval mode inside featlab.capture(eval=True); got "
                    f"{len(training)} in training mode ({shown}{more}): something called "
                    ".train() inside the `with` block (a training loop, a framework callback). "
                    "Fix: keep .train() out of the block, or pass eval=False to capture the model "
                    "in the mode you set.")
        self._forward = _Forward(len(self._hooked), len(self._targets))

    def _make_hook(self, slot: int, name: str, targets: tuple[int, ...]) -> Callable:
        selectors = [(i, self._targets[i].selector) for i in targets]
        copy, keep_all, keep_graph = self._copy, self._keep_all, self._keep_graph
        to_host = self._device is not None and self._device.type == "cpu"

        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            fw = self._forward
            if fw is None:
                return self._outside_forward(name)
            calls = fw.counts[slot]
            fw.counts[slot] = calls + 1
            if calls and not keep_all:
                return None  # reported as reuse when the forward ends; copying would be wasted
            result = output
            for i, selector in selectors:
                value = output if selector is None else select(output, selector, name)
                if not isinstance(value, torch.Tensor):
                    raise not_a_tensor(self._targets[i], value)
                if to_host and value.is_cuda:
                    fw.sync.add(value.device)
                stored = copy(value)
                fw.values[i].append(stored)
                if keep_graph and stored.requires_grad:
                    # the model continues with a copy of `stored`: gradients reach `stored`
                    # exactly as they reach the real output, and later in-place ops change the
                    # continuation, not the stored value
                    result = replace(result, selector, stored.to(value.device, copy=True))
            return None if result is output else result

        return hook

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        fw, self._forward = self._forward, None
        if fw is None:  # the root ran re-entrantly inside its own forward: nothing to close
            return
        for device in fw.sync:  # async device-to-host copies must land before anyone reads them
            torch.cuda.current_stream(device).synchronize()
        counts = fw.counts
        silent = [name for slot, (name, _, _) in enumerate(self._hooked) if counts[slot] == 0]
        if silent:
            raise SkipPointNotFiredError(
                f"every captured module must run in the forward of {type(self._root).__name__}; "
                f"got no call of {', '.join(map(repr, silent))}. The module may sit in a branch "
                "this input does not take, or be unused by forward(). Fix: capture modules that "
                "run (see `featlab points`), or check the input.")
        reused = [(name, counts[slot]) for slot, (name, _, _) in enumerate(self._hooked)
                  if counts[slot] > 1]
        if reused and not self._keep_all:
            listed = ", ".join(f"{n!r} ({c} calls)" for n, c in reused)
            raise ReusedModuleError(
                f"each captured module must run once per forward; got {listed}. featlab cannot "
                "tell which call you mean. Fix: pass on_reuse='all' to store every call as "
                "'name#0', 'name#1', ..., or capture a module that runs once (e.g. the enclosing "
                "block).")
        values: dict[str, torch.Tensor] = {}
        for target, copies in zip(self._targets, fw.values):
            if len(copies) == 1:
                values[target.key] = copies[0]
            else:
                values.update((f"{target.key}#{j}", c) for j, c in enumerate(copies))
        self._values = values
        self._calls = {t.key: counts[s] for t, s in zip(self._targets, self._slot_of)}

    def _outside_forward(self, name: str) -> None:
        if getattr(torch._C, "_current_graph_task_id", lambda: -1)() != -1:
            return None  # activation checkpointing re-runs modules during backward: not a forward
        raise ConfigError(
            f"captured modules must run inside a forward of the model given to capture "
            f"({type(self._root).__name__}); got a call of {name!r} on its own. The model's "
            "forward delimits what one forward is. Fix: call model(x), or capture the submodule "
            "you call: featlab.capture(model.features, ...) with names relative to it.")

    def _make_copy(self) -> Callable[[torch.Tensor], torch.Tensor]:
        device, dtype, detach = self._device, self._dtype, not self._keep_graph
        if device is None and dtype is None:
            if detach:
                return lambda v: v.detach().clone()
            return lambda v: v.clone()
        to_cpu = device is not None and device.type == "cpu"

        def copy(v: torch.Tensor) -> torch.Tensor:
            if detach:
                v = v.detach()
            # only device-to-host is asynchronous: the copy is ordered on the device stream before
            # any later in-place op; a host source could be rewritten before an async copy ran
            return v.to(device=device, dtype=dtype, copy=True,
                        non_blocking=detach and to_cpu and v.is_cuda)

        return copy

    def _missing(self, key: str) -> str:
        if f"{key}#0" in self._values:
            calls = sum(1 for k in self._values if k.rpartition("#")[0] == key)
            return (f"{key!r} ran {calls} times in the latest forward; its calls are stored as "
                    f"'{key}#0' ... '{key}#{calls - 1}'.")
        if not self._values:
            return (f"no value for {key!r}: no forward of {type(self._root).__name__} completed "
                    "inside the `with` block. Fix: call model(x) inside `with capture(...)`.")
        return (f"{key!r} is not a captured point; got {sorted(self._values)}."
                f"{did_you_mean(key, self._values)}")


def _as_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    try:
        return torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"`device` of capture must be a torch device such as 'cpu' or 'cuda:0'; "
                          f"got {device!r}.") from None


def _as_dtype(dtype: Any) -> torch.dtype | None:
    if dtype is None:
        return None
    value = getattr(torch, dtype.removeprefix("torch."), None) if isinstance(dtype, str) else dtype
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(f"`dtype` of capture must be a floating dtype such as 'float16' or "
                          f"torch.float32; got {dtype!r}.")
    return value


class _CallableModule(types.ModuleType):
    """``featlab.capture`` names both this module and :func:`capture`.

    Once anything runs ``import featlab.capture`` (or ``from featlab.capture import ...``), the
    import system binds the *module* to ``featlab.capture``, which would break the public call
    ``featlab.capture(model, points)``. Making the module callable keeps both spellings working.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Recorder:
        return capture(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
