"""The traced graph behind skip-point discovery: tracing, dominators and measuring dry runs.

:func:`featlab.points.skip_points` traces a model with :class:`_Tracer` (which remembers the
module that returned each node and the module each node was created in), finds the cuts with
:func:`_dominators`, stops at the first global pool (:func:`_is_global_pool`) and measures output
shapes by running the graph on zero inputs (:class:`_Runner`, :func:`_measure`,
:func:`_second_size`). Private to featlab; the names keep their underscores because the module
only serves :mod:`featlab.points`.
"""

from __future__ import annotations

from collections import Counter, defaultdict

import torch
from torch import fx, nn

from featlab.errors import FeatlabError, InputSizeError


class _Tracer(fx.Tracer):
    """Records, for every module call, the node it returned, and per node the calling module."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.returned: defaultdict[fx.Node, list[str]] = defaultdict(list)
        self.scopes: dict[str, str] = {}
        self._scope = ""

    def call_module(self, m: nn.Module, forward, args, kwargs):  # noqa: ANN001
        try:
            name = self.path_of_module(m)
        except NameError:  # a module created inside forward: not hookable by name
            return super().call_module(m, forward, args, kwargs)
        self.calls[name] += 1
        outer, self._scope = self._scope, name
        try:
            out = super().call_module(m, forward, args, kwargs)
        finally:
            self._scope = outer
        if isinstance(out, fx.Proxy):  # inner calls return first: innermost module listed first
            self.returned[out.node].append(name)
        return out

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, *rest):  # noqa
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, *rest)
        self.scopes[proxy.node.name] = self._scope
        return proxy


class _TooSmall(RuntimeError):
    """A feature map became empty: the input is too small (PyTorch does not always raise)."""


def _run(graph: fx.Graph, root: nn.Module, x: torch.Tensor, stop: fx.Node | None) -> dict:
    """Run the graph on ``x`` up to (not including) ``stop``; node name -> output shape."""
    modules = dict(root.named_modules())
    last_use = {}
    for node in graph.nodes:
        for arg in node.all_input_nodes:
            last_use[arg] = node
    env, shapes = {}, {}
    placeholders = 0
    for node in graph.nodes:
        if node is stop or node.op == "output":
            break
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        if node.op == "placeholder":
            value = x if placeholders == 0 else (args[0] if args else None)
            placeholders += 1
        elif node.op == "get_attr":
            value = root
            for part in node.target.split("."):
                value = getattr(value, part)
        elif node.op == "call_module":
            value = modules[node.target](*args, **kwargs)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        else:
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        if isinstance(value, torch.Tensor):
            shapes[node.name] = tuple(value.shape)
            if value.dim() >= 3 and 0 in value.shape[2:]:
                raise _TooSmall(f"{node.name} has an empty spatial dim {tuple(value.shape)}")
        elif isinstance(value, (tuple, list)) and value and all(
                isinstance(v, torch.Tensor) for v in value):
            shapes[node.name] = [tuple(v.shape) for v in value]
        env[node] = value
        for arg in node.all_input_nodes:  # free activations after their last use
            if last_use.get(arg) is node:
                del env[arg]
    return shapes


def _dominators(graph: fx.Graph, source: fx.Node) -> list[fx.Node]:
    """Nodes on every path from ``source`` to the output, in execution order (Cooper et al.).

    Only paths that carry values count: a node that reads a tensor's metadata (``x.shape``,
    ``x.size()``) passes none on, so ``F.interpolate(out, size=x.shape[-2:])`` -- how a
    segmentation model returns to its input's size -- does not bypass every layer.
    """
    order = {node: i for i, node in enumerate(graph.nodes)}
    reach = {source}
    idom = {source: source}
    for node in graph.nodes:
        preds = [a for a in node.all_input_nodes if a in reach]
        if node is source or not preds or _reads_metadata(node):
            continue
        reach.add(node)
        dom = preds[0]
        for other in preds[1:]:
            while dom is not other:
                while order[dom] > order[other]:
                    dom = idom[dom]
                while order[other] > order[dom]:
                    other = idom[other]
        idom[node] = dom
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    chain, node = [], idom.get(output, source)
    while node is not source:
        chain.append(node)
        node = idom[node]
    return chain[::-1]


_METADATA_ATTRS = {"shape", "dtype", "device", "ndim"}
_METADATA_METHODS = {"size", "dim", "get_device"}


def _reads_metadata(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is getattr:
        return len(node.args) > 1 and node.args[1] in _METADATA_ATTRS
    return node.op == "call_method" and node.target in _METADATA_METHODS


_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, nn.Linear)
_POOL_FUNCTIONS = {"adaptive_avg_pool2d", "adaptive_max_pool2d", "flatten", "mean", "amax"}


def _is_global_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], _POOL_MODULES)
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "")
    return name in _POOL_FUNCTIONS


def _in_channels(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    convs = (modules[n.target] for n in graph.nodes if n.op == "call_module")
    conv = next((m for m in convs if isinstance(m, nn.Conv2d)), None)  # first to run
    return conv.in_channels if conv is not None else 3


class _Runner:
    """Runs the traced graph on zero inputs of a given size (batch 1), up to ``stop``."""

    def __init__(self, graph: fx.Graph, root: nn.Module, channels: int, like: torch.Tensor):
        self.graph, self.root, self.channels, self.like = graph, root, channels, like

    def __call__(self, size: tuple[int, int], stop: fx.Node | None) -> dict:
        x = torch.zeros(1, self.channels, *size, dtype=self.like.dtype, device=self.like.device)
        return _run(self.graph, self.root, x, stop)


def _second_size(run: _Runner, size: tuple[int, int], stop: fx.Node | None, step: int
                 ) -> tuple[dict, int]:
    """Shapes at a second input size ``step`` px smaller (cheaper) when that runs, else larger.

    ``step`` is a multiple of every effective stride on the way, so each output side changes by
    exactly ``step / stride`` (floor and ceil rounding cancel out).
    """
    if min(size) - step >= 32:
        try:
            return run((size[0] - step, size[1] - step), stop), -step
        except (RuntimeError, ValueError, IndexError):
            pass
    return run((size[0] + step, size[1] + step), stop), step


def _measure(run: _Runner, size: tuple[int, int], stop: fx.Node | None) -> dict:
    """Shapes at ``size``; a size failure becomes an InputSizeError naming the smallest size."""
    try:
        return run(size, stop)
    except (RuntimeError, ValueError, IndexError) as err:
        failure = err

    def works(side: int) -> bool:
        try:
            run((side, side), stop)
            return True
        except (RuntimeError, ValueError, IndexError):
            return False

    name = type(run.root).__name__
    lo, hi = min(size), max(2 * max(size), 8)
    while not works(hi):  # find a size that works, then bisect down to the smallest
        lo, hi = hi, 2 * hi
        if hi > max(4 * max(size), 512):
            raise FeatlabError(f"running {name} must succeed on a dummy input [1, {run.channels}, "
                               f"{size[0]}, {size[1]}]; it failed ({failure}) and larger inputs "
                               "fail too. Fix: check that the model runs on a plain image tensor;"
                               f" pass in_channels= if it does not take {run.channels}.") \
                from failure
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if works(mid) else (mid, hi)
    error = InputSizeError(
        f"`input_size` must be at least {hi} px per side for {name}; got {size[0]}x{size[1]} "
        f"({str(failure).splitlines()[0][:160]}). Fix: pass input_size={hi} or larger.")
    error.minimum = hi
    raise error from failure
