"""What the names a user passes to :func:`featlab.capture` refer to.

A point is a module path of the (unwrapped) model, optionally with a selector for one element of
a tuple/list/dict output (``"heads[0]"``, ``"aux['out']"``), a ``SkipPoint`` record, or a
selection over the skip points (``"stages"``, globs, ``"re:..."``). This module resolves them to
:class:`Target` records before any hook exists, so a misspelt name fails early, and picks the
selected element out of a module's output inside the hook.
"""

from __future__ import annotations

import copy as _copy
import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from featlab.errors import ConfigError, SkipPointNotFoundError, did_you_mean

# "name[0]", "name[-1]", "name['out']", 'name["out"]': one element of a tuple/list/dict output
_SELECTOR = re.compile(r"^(?P<base>.*)\[(?P<sel>-?\d+|'[^'\]]*'|\"[^\"\]]*\")\]$")
SELECTOR_HELP = ("\"name[0]\" for an element of a tuple/list, \"name['out']\" for a key of a dict")


@dataclass(frozen=True)
class Target:
    key: str                      # name in the mapping (as the user wrote it, or SkipPoint.name)
    module: str                   # module path in the unwrapped model
    selector: int | str | None    # element of a tuple/list/dict output


# -- resolution --------------------------------------------------------------------------------
def unwrap(model: nn.Module) -> tuple[nn.Module, str]:
    """The module whose submodules get hooks, and the name prefix the wrapper adds."""
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` of capture must be a torch.nn.Module; got "
                          f"{type(model).__name__}.")
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError("`model` of capture must be an eager nn.Module; got a TorchScript "
                          "module, whose submodules do not call Python hooks. Fix: capture the "
                          "eager model before torch.jit.script.")
    if hasattr(model, "_orig_mod") and type(model).__name__ == "OptimizedModule":
        raise ConfigError(
            "`model` of capture must be an uncompiled module; got the output of torch.compile, "
            "whose compiled graph does not reliably call hooks added to its submodules. Fix: "
            "capture the original module, which shares the parameters: "
            "featlab.capture(model._orig_mod, ...) and call model._orig_mod(x) inside the block.")
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return unwrap(model.module)[0], "module."
    if isinstance(model, nn.DataParallel):
        if len(model.device_ids) > 1:
            raise ConfigError(
                f"`model` of capture must run in one thread; got DataParallel over devices "
                f"{model.device_ids}, whose replicas share the hooks and call them concurrently. "
                "Fix: capture model.module on one device per process (torchrun, featlab "
                "extraction shards the data by rank), or DataParallel(model, device_ids=[0]).")
        return unwrap(model.module)[0], "module."
    return model, ""


def resolve(root: nn.Module, modules: dict[str, nn.Module], points: Any, prefix: str
             ) -> list[Target]:
    found: list[Target] = []
    discovered: list[Any] | None = None

    def skip_points() -> list[Any]:
        nonlocal discovered
        if discovered is None:
            discovered = _discover(root)
        return discovered

    if points is None or isinstance(points, str) or _is_point(points):
        items = [points]
    elif isinstance(points, Sequence):
        items = list(points)
    else:
        raise ConfigError(f"`points` of capture must be None, a name, a SkipPoint or a list of "
                          f"them; got {type(points).__name__}.")
    # a comma-separated selection is a list (unless the string is itself a module name)
    items = [part for item in items for part in (
        [s.strip() for s in item.split(",") if s.strip()]
        if isinstance(item, str) and "," in item and item not in modules else [item])]
    for item in items:
        if item is None:
            found += [Target(p.name, *_module_of(p, modules, root)) for p in skip_points()]
        elif _is_point(item):
            found.append(Target(item.name, *_module_of(item, modules, root)))
        elif isinstance(item, str):
            parsed = _parse_name(item, modules, prefix)
            if parsed is not None:
                found.append(Target(item, *parsed))
            elif _is_selection(item) and not _SELECTOR.match(item):
                found += _select(item, skip_points, modules, root)
            else:
                raise _unknown(item, root, modules)
        else:
            raise ConfigError(f"`points` entries must be names or SkipPoints; got {item!r}.")
    unique: dict[str, Target] = {}
    for target in found:
        unique.setdefault(target.key, target)  # first occurrence wins; order is request order
        if "_orig_mod" in target.module.split("."):  # inside a torch.compile'd submodule
            owner = target.module[:target.module.index("_orig_mod") - 1]
            raise ConfigError(
                f"`points` must name modules whose hooks run; got {target.key!r} inside "
                f"{owner!r}, a torch.compile'd submodule whose compiled graph does not call hooks "
                f"added to its submodules. Fix: capture {owner!r} itself, or undo the compile "
                f"(model.{owner} = model.{owner}._orig_mod) while capturing.")
    if not unique:
        raise ConfigError("`points` of capture must select at least one module; got an empty "
                          "selection. Fix: pass None for all skip points.")
    return list(unique.values())


def _select(pattern: str, skip_points: Any, modules: Mapping[str, nn.Module], root: nn.Module
            ) -> list[Target]:
    """A preset, glob or ``re:`` pattern: the skip points it selects, or, when it matches none,
    every module whose name it matches (``layer*.?.bn2``: capture hooks any module)."""
    from featlab.points import select_points

    try:
        return [Target(p.name, *_module_of(p, modules, root))
                for p in select_points(skip_points(), pattern)]
    except SkipPointNotFoundError:
        if pattern.startswith("re:"):
            regex = re.compile(pattern[3:])  # it compiled in select_points
            names = [n for n in modules if n and regex.fullmatch(n)]
        else:
            names = [n for n in modules if n and fnmatch.fnmatchcase(n, pattern)]
        if not names:
            raise
        return [Target(n, n, None) for n in names]


def _discover(root: nn.Module) -> list[Any]:
    from featlab.points import skip_points
    # discovery runs the model once; in eval mode so batch-norm statistics are not updated
    modes = [(m, m.training) for m in root.modules()]
    root.eval()
    try:
        return skip_points(root)
    finally:
        for module, training in modes:
            module.training = training


def _is_point(item: Any) -> bool:
    return not isinstance(item, str) and isinstance(getattr(item, "module", None), str) \
        and isinstance(getattr(item, "name", None), str)


def _is_selection(item: str) -> bool:
    return item in ("all", "stages") or item.startswith("re:") or any(c in item for c in "*?[")


def _parse_name(name: str, modules: Mapping[str, nn.Module], prefix: str
                ) -> tuple[str, int | str | None] | None:
    if prefix and name.startswith(prefix) and name not in modules:
        name = name[len(prefix):]
    if name in modules:
        return name, None
    match = _SELECTOR.match(name)
    if match is None or match["base"] not in modules:
        return None
    sel = match["sel"]
    return match["base"], (int(sel) if sel[0] not in "'\"" else sel[1:-1])


def _module_of(point: Any, modules: Mapping[str, nn.Module], root: nn.Module
               ) -> tuple[str, int | str | None]:
    parsed = _parse_name(point.module, modules, "")
    if parsed is None:
        raise SkipPointNotFoundError(
            f"SkipPoint {point.name!r} must name a module of {type(root).__name__}; got module "
            f"{point.module!r}, which this model does not have."
            f"{did_you_mean(point.module, modules)} Fix: discover the points on this model: "
            "featlab.skip_points(model).")
    return parsed


def _unknown(name: str, root: nn.Module, modules: Mapping[str, nn.Module]) -> Exception:
    match = _SELECTOR.match(name)
    if match:  # "name[0]" is always a selector (a glob must not end in "[digits]")
        name = match["base"]
    owner = name.rpartition(".")[0]
    for kind, named in (("parameter", root.named_parameters()), ("buffer", root.named_buffers())):
        if name in dict(named):
            return SkipPointNotFoundError(
                f"`points` must name modules; got {name!r}, which is a {kind} of module "
                f"{owner or '(the model itself)'!r}. Fix: capture the module's output: "
                f"{owner!r}.")
    return SkipPointNotFoundError(
        f"`points` must name modules of {type(root).__name__}; got {name!r}."
        f"{did_you_mean(name, [n for n in modules if n])} Fix: see "
        "[n for n, _ in model.named_modules()] or `featlab points MODEL`.")


# -- outputs -----------------------------------------------------------------------------------
def select(output: Any, selector: int | str, name: str) -> Any:
    if isinstance(output, Mapping) and selector in output:
        return output[selector]
    if isinstance(selector, int) and isinstance(output, (tuple, list)) \
            and -len(output) <= selector < len(output):
        return output[selector]
    raise ConfigError(f"selector [{selector!r}] of {name!r} must pick an element of the module's "
                      f"output; got {_describe(output)}. Syntax: {SELECTOR_HELP}.")


def replace(output: Any, selector: int | str | None, value: torch.Tensor) -> Any:
    if selector is None:
        return value
    if isinstance(output, Mapping):
        output = _copy.copy(output)
        output[selector] = value
        return output
    items = list(output)
    items[selector] = value
    if isinstance(output, list):
        return items
    return type(output)(*items) if hasattr(output, "_fields") else tuple(items)


def not_a_tensor(target: Target, value: Any) -> ConfigError:
    if isinstance(value, (tuple, list, Mapping)):
        return ConfigError(
            f"point {target.key!r} must select one tensor; got {_describe(value)} from module "
            f"{target.module!r}, and featlab never guesses which element you mean. Fix: add a "
            f"selector: {SELECTOR_HELP}, e.g. {target.key + '[0]'!r}.")
    return ConfigError(f"point {target.key!r} must be a tensor; got {_describe(value)} from "
                       f"module {target.module!r}. Fix: capture a module that returns a tensor.")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{list(value.shape)}"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"a {type(value).__name__} of {len(value)} ({inner})"
    return type(value).__name__
