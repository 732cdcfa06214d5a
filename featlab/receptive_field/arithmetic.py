"""The arithmetic behind :func:`graph_receptive_fields`: per-axis fields, the graph walk, merges.

:class:`RFAxis` applies the closed forms of Araujo et al. (Distill 2019) along one axis;
:func:`graph_receptive_fields` walks a traced graph in execution order and asks the rule of each
node's layer type (registered with :func:`_rule`; the rules live in
:mod:`featlab.receptive_field.rules`) for the node's propagation state; :func:`_merge` is where
branches meet. The rule protocol (``_State``, ``_CONST``, ``_unknown``, ``_Context``, ``_rule``,
``_describe``, ``_merge``) is private to the package and shared with ``rules``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import fx, nn

logger = logging.getLogger("featlab")

__all__ = ["RFAxis", "ReceptiveField", "graph_receptive_fields"]


@dataclass(frozen=True)
class RFAxis:
    """Receptive field along one axis, in input pixels.

    Attributes:
        size: r, the number of input pixels one unit sees (before clipping at the border).
        jump: S, input pixels between neighbouring units (the effective stride).
        start: first input pixel seen by unit 0; ``-start`` is the effective padding P.
    """

    size: int = 1
    jump: int = 1
    start: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or self.jump < 1:
            raise ValueError(f"RFAxis needs size >= 1 and jump >= 1; got {self}.")

    @property
    def padding(self) -> int:
        """Effective padding P (Araujo et al. 2019): ``-start``."""
        return -self.start

    @property
    def centre2(self) -> int:
        """Twice the centre of unit 0 (an integer even for even sizes)."""
        return 2 * self.start + self.size - 1

    def conv(self, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> RFAxis:
        """The field after a window op (convolution, pooling) with these settings.

        Examples:
            >>> RFAxis().conv(7, 2, 3).conv(3, 2, 1)     # ResNet stem: conv1, maxpool
            RFAxis(size=11, jump=4, start=-5)
        """
        extent = dilation * (kernel - 1) + 1
        return RFAxis(self.size + (extent - 1) * self.jump, self.jump * stride,
                      self.start - padding * self.jump)


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of one tensor: both axes (``None`` when unknown) and a status.

    Attributes:
        h: field along the height axis.
        w: field along the width axis.
        status: ``"exact"``, ``"exact; <note>"`` (global context, misaligned branches) or
            ``"unknown: <op> at <where>"`` / ``"global: ..."`` (no local field).
    """

    h: RFAxis | None
    w: RFAxis | None
    status: str = "exact"

    @property
    def size(self) -> int | None:
        """r along H."""
        return None if self.h is None else self.h.size

    @property
    def stride(self) -> int | None:
        """S along H."""
        return None if self.h is None else self.h.jump

    @property
    def padding(self) -> int | None:
        """P along H."""
        return None if self.h is None else self.h.padding


@dataclass(frozen=True)
class _State:
    """Propagation state of a node: spatial (a field per axis), global, const or unknown."""

    kind: str                                # "spatial" | "global" | "const" | "unknown"
    layout: tuple[str | None, ...] = ()      # per tensor dim: "h", "w" or None
    h: RFAxis | None = None
    w: RFAxis | None = None
    via: tuple[str, ...] = ()                # global context reaching a spatial tensor
    notes: tuple[str, ...] = ()              # e.g. misaligned merges
    reason: str = ""                         # why unknown / where the global pool is

    def to_rf(self) -> ReceptiveField:
        if self.kind == "spatial":
            parts = ["exact"]
            for items, prefix in ((self.via, "global context via "), (self.notes, "")):
                if items:
                    more = f" (+{len(items) - 1} more)" if len(items) > 1 else ""
                    parts.append(f"{prefix}{items[0]}{more}")
            return ReceptiveField(self.h, self.w, "; ".join(parts))
        status = {"global": f"global: pooled at {self.reason}",
                  "const": "const: does not depend on the input"}.get(self.kind, self.reason)
        return ReceptiveField(None, None, status)


_CONST = _State("const")


def _unknown(reason: str) -> _State:
    return _State("unknown", reason=f"unknown: {reason}")


def graph_receptive_fields(graph: fx.Graph, root: nn.Module, shapes: Mapping[str, object],
                           scopes: Mapping[str, str] | None = None) -> dict[str, ReceptiveField]:
    """Receptive field of every node of a traced graph, relative to its first placeholder.

    Args:
        graph: a ``torch.fx`` graph of ``root`` (traced in eval mode).
        root: the traced module (for ``call_module`` / ``get_attr`` targets).
        shapes: node name -> output shape (tuple), list of shapes (tuple/list outputs) or None,
            measured by running the graph once (adaptive pools and reshapes need them).
        scopes: node name -> path of the module whose forward created it (names in statuses).

    Returns:
        Node name -> :class:`ReceptiveField` (non-tensor and constant nodes included, with a
        status saying so).

    Examples:
        >>> import featlab.testing as ft
        >>> net = ft.DilatedNet()
        >>> graph = fx.Tracer().trace(net)
        >>> shapes = {n.name: (1, 3, 32, 32) if n.op == "placeholder" else (1, 4, 32, 32)
        ...           for n in graph.nodes}
        >>> graph_receptive_fields(graph, net, shapes)["convs_2"].h
        RFAxis(size=15, jump=1, start=-7)
    """
    modules = dict(root.named_modules())
    states: dict[fx.Node, _State] = {}
    first_input = True
    for node in graph.nodes:
        if node.op == "placeholder":
            shape = shapes.get(node.name)
            if first_input and isinstance(shape, tuple) and len(shape) >= 2:
                layout = (None,) * (len(shape) - 2) + ("h", "w")
                states[node] = _State("spatial", layout, RFAxis(), RFAxis())
            else:
                states[node] = _CONST
            first_input = False
            continue
        if node.op in ("get_attr", "output"):
            states[node] = _CONST
            continue
        inputs = [states[a] for a in node.all_input_nodes]
        if all(s.kind == "const" for s in inputs):
            states[node] = _CONST
            continue
        where = (node.target if node.op == "call_module" else (scopes or {}).get(node.name, "")) \
            or "(top level)"
        ctx = _Context(node, modules, shapes, states, str(where))
        try:
            states[node] = _apply(ctx)
        except (TypeError, ValueError, IndexError, KeyError) as err:
            # a rule met arguments it does not understand: say so rather than guess
            logger.debug("receptive field rule failed at %s: %s", node.name, err)
            states[node] = _unknown(f"{_describe(ctx)} at {where} ({err})")
    return {node.name: state.to_rf() for node, state in states.items()}


# -- rule protocol -----------------------------------------------------------------------------
class _Context:
    """What a rule may look at: the node, its module, measured shapes and its inputs' states."""

    def __init__(self, node: fx.Node, modules: Mapping[str, nn.Module],
                 shapes: Mapping[str, object], states: Mapping[fx.Node, _State], where: str):
        self.node, self.shapes, self.states, self.where = node, shapes, states, where
        self.module = modules.get(node.target) if node.op == "call_module" else None

    def state(self, value: object) -> _State:
        return self.states[value] if isinstance(value, fx.Node) else _CONST

    def shape(self, value: object) -> object:
        return self.shapes.get(value.name) if isinstance(value, fx.Node) else None

    def sizes(self, *values: object) -> list:
        """The measured shapes of ``values``, for rules that need them; ``ValueError`` (the rule
        then reports unknown) where one was not measured, e.g. after the deepest point, where
        measuring stops."""
        shapes = [self.shape(v) for v in values]
        if any(s is None for s in shapes):
            raise ValueError("sizes not measured")
        return shapes

    def bind(self, names: tuple[str, ...], **defaults: object) -> dict[str, object]:
        bound = dict(defaults)
        bound.update(zip(names, self.node.args))
        bound.update(self.node.kwargs)
        return bound


_MODULE_RULES: dict[type, Callable[[_Context], _State]] = {}
_FUNCTION_RULES: dict[object, Callable[[_Context], _State]] = {}
_METHOD_RULES: dict[str, Callable[[_Context], _State]] = {}


def _rule(*keys: object, unary: bool = True) -> Callable:
    """Register a rule for module types, functions, ``"Tensor.method"`` names or qualified names.

    A unary rule receives the state of the first argument and only runs on spatial states:
    unknown and global states pass through unchanged.
    """
    def register(fn: Callable) -> Callable:
        def unary_rule(ctx: _Context) -> _State:
            args = ctx.node.args or tuple(ctx.node.kwargs.values())
            x = ctx.state(args[0]) if args else _CONST
            return fn(ctx, x) if x.kind == "spatial" else x
        rule = unary_rule if unary else fn
        for key in keys:
            if isinstance(key, type):
                _MODULE_RULES[key] = rule
            elif isinstance(key, str) and key.startswith("Tensor."):
                _METHOD_RULES[key[len("Tensor."):]] = rule
            else:
                _FUNCTION_RULES[key] = rule
        return fn
    return register


def _describe(ctx: _Context) -> str:
    node = ctx.node
    if node.op == "call_module":
        return type(ctx.module).__name__
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    return getattr(node.target, "__name__", str(node.target))


def _apply(ctx: _Context) -> _State:
    node = ctx.node
    rule = None
    if node.op == "call_module":
        rule = next((_MODULE_RULES[c] for c in type(ctx.module).__mro__ if c in _MODULE_RULES),
                    None)
    elif node.op == "call_function":
        rule = _FUNCTION_RULES.get(node.target) or _FUNCTION_RULES.get(
            f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', '')}")
    elif node.op == "call_method":
        rule = _METHOD_RULES.get(node.target)
    if rule is None:
        return _unknown(f"{_describe(ctx)} at {ctx.where}")
    return rule(ctx)


def _merge(ctx: _Context, operands: list, gate: bool) -> _State:
    """Branches meet: union of fields (= max when centres align), strides must agree."""
    states = [ctx.state(o) for o in operands]
    for s in states:
        if s.kind == "unknown":
            return s
    spatial = [s for s in states if s.kind == "spatial"]
    pooled = [s for s in states if s.kind == "global"]
    if not spatial:
        return pooled[0] if pooled else _CONST

    def placement(s: _State) -> tuple:  # broadcasting aligns dims from the right
        return tuple((i - len(s.layout), label) for i, label in enumerate(s.layout) if label)

    if len({placement(s) for s in spatial}) > 1:
        return _unknown(f"{_describe(ctx)} of differently laid out tensors at {ctx.where}")
    axes, notes = {}, []
    for label in ("h", "w"):
        fields = [getattr(s, label) for s in spatial if getattr(s, label) is not None]
        if not fields:
            continue
        jumps = sorted({f.jump for f in fields})
        if len(jumps) > 1:
            return _unknown(f"{_describe(ctx)} of branches with strides {jumps} at {ctx.where}")
        start = min(f.start for f in fields)
        stop = max(f.start + f.size - 1 for f in fields)
        axes[label] = RFAxis(stop - start + 1, jumps[0], start)
        if len({f.centre2 for f in fields}) > 1:
            notes.append(f"branch centres misaligned at {ctx.where} (field is their union)")
    sources = [f"SE at {s.reason.rpartition('.')[0] or s.reason}" if gate
               else f"global pool at {s.reason}" for s in pooled]
    via = tuple(dict.fromkeys([v for s in spatial for v in s.via] + sources))
    notes = tuple(dict.fromkeys([n for s in spatial for n in s.notes] + notes))
    base = max(spatial, key=lambda s: len(s.layout))
    return _State("spatial", base.layout, axes.get("h"), axes.get("w"), via, notes)
