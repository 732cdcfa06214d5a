"""Skip points: the cuts of a backbone's graph where a full feature map is available.

A skip point is a tensor ``[N, C, H, W]`` through which every path from the input to the final
spatial features passes: a *dominator* of the graph's output, seen from the input. featlab
traces the model with ``torch.fx`` (in eval mode), keeps the dominators up to the first global
pool, and names each after the innermost module that returns it and runs exactly once per
forward, so a forward hook captures it (a ResNet block is ``"layer1.0"``, not its reused in-place
``"layer1.0.relu"``). Cuts that no module returns (a functional ``F.relu``) cannot be hooked and
are left out. Shapes come from running the traced graph at ``input_size``, strides from a
second run 64 px smaller or larger (the change in output size; R-12.1), and receptive fields from
:mod:`featlab.receptive_field`. The graph mechanics live in :mod:`featlab._graph`; selection by
presets, globs and names in :mod:`featlab.selection` (:func:`select_points` is re-exported here);
the :class:`SkipPoint` record in :mod:`featlab._point` (re-exported here), which reading a cache
imports without torch.

Examples:
    >>> import featlab.testing as ft
    >>> points = skip_points(ft.TinyResNet(), input_size=32)
    >>> [(p.name, p.stride, p.rf_size) for p in points]
    [('conv1', 2, 3), ('bn1', 2, 3), ('relu', 2, 3), ('layer1.0', 2, 11), ('layer1.1', 4, 23)]
    >>> [p.name for p in select_points(points, "stages")]
    ['layer1.0', 'layer1.1']
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import torch
from torch import fx, nn

from featlab._graph import (_dominators, _in_channels, _is_global_pool, _measure, _Runner,
                            _second_size, _Tracer)
from featlab._point import SkipPoint
from featlab.errors import ConfigError, GraphTraceError, SkipPointNotFoundError
from featlab.receptive_field import graph_receptive_fields
from featlab.selection import _select, select_points

logger = logging.getLogger("featlab")

__all__ = ["SkipPoint", "skip_points", "select_points"]

_STRIDE_DELTA = 64   # least change of input size between the two measuring runs


# -- discovery ---------------------------------------------------------------------------------
def unwrap_model(model: object) -> nn.Module:
    """Strip torch.compile (``_orig_mod``) and DataParallel / DDP (``.module``) wrappers."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            break
    if not isinstance(model, nn.Module):
        raise ConfigError(f"`model` must be a torch.nn.Module; got {type(model).__name__}. "
                          "Fix: pass the network, e.g. featlab.get_backbone('resnet18')[0].")
    return model


def _pair(size: object) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size) if isinstance(
        size, (tuple, list)) else ()
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                 for s in pair):
        raise ConfigError(f"`input_size` must be a positive int or (H, W); got {size!r}. "
                          "Fix: e.g. input_size=224.")
    return pair


def skip_points(model: nn.Module, input_size: int | tuple[int, int] = 224, *,
                select: str | Sequence[str] = "all", in_channels: int | None = None
                ) -> list[SkipPoint]:
    """Discover a model's skip points, in execution order, measured at ``input_size``.

    The model is traced with ``torch.fx`` and run twice at batch 1 (at ``input_size`` and 64 px
    smaller, or larger for small inputs; both runs stop at the global pool), in eval mode under
    ``no_grad``; its training flags are restored afterwards and nothing is left attached.
    Cost: the trace (tens of ms) and about 1.5 forward passes, e.g. ~0.3 s for resnet50 at
    224 px on one idle CPU core (more when the cores are shared with other work).

    Args:
        model: a CNN (torch.compile / DataParallel / DDP wrappers are unwrapped; names are
            relative to the wrapped network).
        input_size: side, or (H, W), of the dummy input.
        select: a selection passed to :func:`select_points` (default ``"all"``).
        in_channels: input channels; default the first Conv2d's ``in_channels``.

    Returns:
        The selected :class:`SkipPoint` records, in execution order.

    Raises:
        InputSizeError: the input is too small for the network (the message gives the
            smallest size that runs).
        GraphTraceError: ``torch.fx`` cannot trace the model.
        SkipPointNotFoundError: the model has no skip point, or ``select`` matches none.

    Examples:
        >>> import featlab.testing as ft
        >>> [p.name for p in skip_points(ft.TinyCNN(), 16)]
        ['features.0', 'features.1', 'features.2', 'features.3', 'features.4', 'features.5']
    """
    started = time.perf_counter()
    root = unwrap_model(model)
    size = _pair(input_size)
    if in_channels is not None and not (isinstance(in_channels, int) and in_channels >= 1):
        raise ConfigError(f"`in_channels` must be a positive int or None; got {in_channels!r}.")
    modes = [(m, m.training) for m in root.modules()]
    try:
        root.eval()  # trace and measure what inference computes (dropout off, BN statistics)
        with torch.no_grad():
            points = _discover(root, size, in_channels)
    finally:
        for module, training in modes:
            module.training = training
    logger.debug("skip_points(%s, %s): %d points in %.2f s", type(root).__name__, size,
                 len(points), time.perf_counter() - started)
    if not points:
        raise SkipPointNotFoundError(
            f"a model must have a skip point, a 4-D feature map on every path from its input to "
            f"its output; {type(root).__name__} has none (parallel branches joined only at the "
            "end?). Fix: pass the part that is one chain (e.g. model.backbone), or capture named "
            "modules with featlab.capture(model, ['layer3', ...]).")
    return _select(points, select, root)


def _discover(root: nn.Module, size: tuple[int, int], in_channels: int | None
              ) -> list[SkipPoint]:
    tracer = _Tracer()
    try:
        graph = tracer.trace(root)
    except Exception as err:  # noqa: BLE001 - any trace failure gets the same guidance
        raise GraphTraceError(
            f"skip_points needs a model that torch.fx can trace; {type(root).__name__} failed "
            f"to trace ({type(err).__name__}: {str(err).splitlines()[0][:200]}). Fix: capture "
            "or extract named modules, featlab.capture(model, ['layer3', ...]) or --points "
            "layer3,layer4 (hooks need no tracing), or remove data-dependent control flow from "
            "forward.") from err
    modules = dict(root.named_modules())
    source = next((n for n in graph.nodes if n.op == "placeholder"), None)
    if source is None:
        raise GraphTraceError(f"skip_points needs a model whose forward takes an input; "
                              f"{type(root).__name__}.forward takes none.")
    chain = _dominators(graph, source)
    stop = next((n for n in chain if _is_global_pool(n, modules)), None)
    run = _Runner(graph, root, in_channels or _in_channels(graph, modules),
                  next(root.parameters(), torch.zeros(())))
    shapes = _measure(run, size, stop)
    fields_ = graph_receptive_fields(graph, root, shapes, tracer.scopes)
    cuts = _cuts(chain, stop, shapes, fields_, tracer)
    if not cuts:
        return []
    # the second run needs a size change that every stride divides, and stops after the last cut
    jumps = [fields_[n.name].stride or 1 for n, _ in cuts]
    step = math.lcm(*jumps) * max(1, math.ceil(_STRIDE_DELTA / math.lcm(*jumps)))
    nodes = list(graph.nodes)
    other, delta = _second_size(run, size, nodes[nodes.index(cuts[-1][0]) + 1], step)
    points = []
    for node, names in cuts:
        (_, c, h, w), grown = shapes[node.name], other[node.name][2] - shapes[node.name][2]
        if grown * delta <= 0 or abs(grown) > abs(delta):
            # constant size (after an adaptive pool) or upsampled (stride < 1): no feature map
            # with an integer stride; say so rather than round
            logger.warning("skip point candidate %s left out: its size changes by %d px when "
                           "the input changes by %d px", names[0], grown, delta)
            continue
        if delta % grown:
            logger.debug("stride of %s is not an integer (%d / %d)", names[0], delta, grown)
        rf = fields_[node.name]
        points.append(SkipPoint(names[0], len(points), names[0], c, (h, w),
                                round(delta / grown), rf.size, rf.stride, rf.padding,
                                rf.status, tuple(names[1:])))
    return points


def _cuts(chain: list[fx.Node], stop: fx.Node | None, shapes: dict, fields_: dict,
          tracer: _Tracer) -> list[tuple[fx.Node, list[str]]]:
    """Hookable 4-D dominators before the global pool, with their module names."""
    cuts = []
    for node in chain:
        shape = shapes.get(node.name)
        if node is stop or (isinstance(shape, tuple) and len(shape) < 3) \
                or fields_[node.name].status.startswith("global:"):
            break  # the global pool, or the features have lost their spatial dims
        if not (isinstance(shape, tuple) and len(shape) == 4):
            continue
        names = [n for n in tracer.returned.get(node, []) if n and tracer.calls[n] == 1]
        if names:
            cuts.append((node, names))
        else:
            logger.debug("cut %s is not returned by a module that runs once; not hookable",
                         node.name)
    return cuts
