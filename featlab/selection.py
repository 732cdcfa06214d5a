"""Skip-point selection: presets (``"all"``, ``"stages"``), globs, ``re:`` patterns and names.

:func:`select_points` picks from the records :func:`featlab.points.skip_points` returns (and is
re-exported from :mod:`featlab.points`); an unknown name or an empty match is a
:class:`~featlab.errors.SkipPointNotFoundError` that suggests close names, and says so when a
parameter name or a module that is not a skip point was given.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from featlab.errors import ConfigError, SkipPointNotFoundError, did_you_mean

if TYPE_CHECKING:  # annotations only: featlab.points imports this module, so no import back
    from torch import nn

    from featlab.points import SkipPoint

__all__ = ["select_points"]

_PRESETS = ("all", "stages")
_PARAM_NAMES = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                "layer_scale", "in_proj_weight", "in_proj_bias"}


def select_points(points: list[SkipPoint], selection: str | Sequence[str]) -> list[SkipPoint]:
    """Pick skip points by preset, pattern or name.

    Args:
        points: skip points of one model (from :func:`featlab.points.skip_points`).
        selection: ``"all"``; ``"stages"`` (the last point at each stride); a glob such as
            ``"layer3.*"`` (fnmatch, case-sensitive); ``"re:<regex>"`` (full match); an exact
            point name or alias (``"layer1"`` for ``"layer1.1"``); a list of these, or a
            comma-separated string.

    Returns:
        The selected points in execution order, without duplicates.

    Raises:
        SkipPointNotFoundError: a name is unknown, a pattern matches nothing, a parameter name
            was given, or the selection is empty.

    Examples:
        >>> import featlab.testing as ft
        >>> from featlab.points import skip_points
        >>> points = skip_points(ft.TinyResNet(), 32)
        >>> [p.name for p in select_points(points, "layer1.*, conv1")]
        ['conv1', 'layer1.0', 'layer1.1']
    """
    return _select(points, selection, None)


def _select(points: list[SkipPoint], selection: str | Sequence[str], model: nn.Module | None
            ) -> list[SkipPoint]:
    """:func:`select_points`; with ``model``, errors name it and recognise its modules and
    parameters (how :func:`featlab.points.skip_points` calls it)."""
    if isinstance(selection, str):
        tokens = [t.strip() for t in selection.split(",") if t.strip()]
    elif isinstance(selection, Sequence) and all(isinstance(t, str) for t in selection):
        tokens = [part.strip() for t in selection for part in t.split(",") if part.strip()]
    else:
        raise ConfigError(f"`points` selection must be a string or a list of strings; got "
                          f"{selection!r}. Fix: e.g. 'stages', 'layer3.*' or ['layer1', 'layer4'].")
    spec = getattr(model, "featlab_spec", None)  # set by get_backbone: the registry's name
    if spec is not None:
        owner, hint = f"skip points of {spec.name}", f" See `featlab points {spec.name}`."
    else:
        owner = f"skip points of {type(model).__name__}" if model is not None else "skip points"
        hint = " List them with featlab.skip_points(model)."
    if not tokens:
        raise SkipPointNotFoundError(f"`points` must select at least one of the {owner}; got an "
                                     f"empty selection {selection!r}. Fix: e.g. 'all'.{hint}")
    names = [n for p in points for n in (p.name, *p.aliases)] + list(_PRESETS)
    chosen: set[int] = set()
    for token in tokens:
        if token == "all":
            hits = list(range(len(points)))
        elif token == "stages":
            last = {p.stride: i for i, p in enumerate(points)}
            hits = sorted(last.values())
        elif token.startswith("re:"):
            try:
                pattern = re.compile(token[3:])
            except re.error as err:
                raise ConfigError(f"`points` regex must compile; got {token!r} ({err}). Fix: "
                                  r"escape dots, e.g. 're:layer3\.\d+'.") from err
            hits = [i for i, p in enumerate(points)
                    if any(pattern.fullmatch(n) for n in (p.name, *p.aliases))]
        elif any(c in token for c in "*?["):
            hits = [i for i, p in enumerate(points)
                    if any(fnmatch.fnmatchcase(n, token) for n in (p.name, *p.aliases))]
        else:
            hits = [i for i, p in enumerate(points) if token in (p.name, *p.aliases)]
        if not hits and token != "all":  # a model may have no skip points; "all" is then []
            raise _not_found(token, names, owner, hint, model)
        chosen.update(hits)
    return [points[i] for i in sorted(chosen)]


def _not_found(token: str, names: list[str], owner: str, hint: str, model: nn.Module | None
               ) -> SkipPointNotFoundError:
    module, _, last = token.rpartition(".")
    params = {} if model is None else dict(model.named_parameters()) | dict(model.named_buffers())
    if token in params or last in _PARAM_NAMES:
        return SkipPointNotFoundError(
            f"`points` must name modules; got {token!r}, which is a parameter or buffer name "
            f"(of module {module or '(the model)'!r}), not a module output. Fix: select the "
            f"module output instead: {module!r}.{did_you_mean(module, names)}{hint}")
    pattern = token[3:] if token.startswith("re:") else token
    probe = re.sub(r"[*?\[\]\\^$+(){}|]", "", pattern)
    kind = "pattern" if pattern != token or probe != token else "name"
    if model is not None and token in dict(model.named_modules()):
        return SkipPointNotFoundError(
            f"`points` must name {owner}; got {token!r}, a module whose output is not a skip "
            "point (a path bypasses it, it runs more than once, or it follows the global pool)."
            f" Fix: featlab.capture(model, [{token!r}]) hooks any module.{hint}")
    return SkipPointNotFoundError(
        f"`points` must name {owner}; got {kind} {token!r}, which matches none."
        f"{did_you_mean(probe, names)}{hint}")
