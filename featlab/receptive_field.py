"""Receptive-field arithmetic on a traced graph: one rule per layer type, a status, never a guess.

For every node of a ``torch.fx`` graph, :func:`graph_receptive_fields` computes per spatial axis
the theoretical receptive field ``size`` r, the effective stride ``jump`` S and the effective
padding P, with the closed forms of Araujo et al. (Distill 2019) applied layer by layer:
``r += (d(k-1)+1 - 1) * S``, ``P += p * S``, ``S *= s``. Unit ``u`` of a feature map then sees
input pixels ``[u*S - P, u*S - P + r - 1]``. One rule per layer type (``_MODULE_RULES``,
``_FUNCTION_RULES``, ``_METHOD_RULES`` below).

Choices a user should know:

* Branches that merge (add, mul, cat) must share the stride; the merged field is the *union* of
  the branches' fields, which equals the max over branches when their centres align (ResNets,
  DenseNets). When centres differ the status says so.
* Global context (a squeeze-excitation gate, a GroupNorm, a global pool feeding back) makes every
  output depend on every input pixel. featlab reports the LOCAL receptive field of the
  convolutional path as the size, and says in the status that global context reaches the point,
  e.g. ``"exact; global context via SE at features.1.0.block.1"``: the local field is what
  spatial detail a unit aggregates, the gate only rescales channels.
* Batch norm is a per-channel affine map in eval mode (the mode featlab traces in).
* An op without a rule gives status ``"unknown: <op> at <where>"`` and no numbers downstream.

:func:`gradient_receptive_field` measures the field empirically on a linearised positive copy of
the model (gradient support of the centre unit), as a cross-check of the arithmetic.

Examples:
    >>> RFAxis().conv(3, padding=1).conv(3, dilation=2, padding=2)
    RFAxis(size=7, jump=1, start=-3)
"""

from __future__ import annotations

import copy
import logging
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from featlab.errors import ConfigError, SkipPointNotFiredError, SkipPointNotFoundError, did_you_mean

logger = logging.getLogger("featlab")

__all__ = ["RFAxis", "ReceptiveField", "EmpiricalRF", "graph_receptive_fields",
           "gradient_receptive_field"]


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


# -- rules -------------------------------------------------------------------------------------
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


def _pair(value: object) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _dim(dim: int, rank: int) -> int:
    if not -rank <= dim < rank:
        raise IndexError(f"dim {dim} out of range for rank {rank}")
    return dim % rank


def _window(ctx: _Context, x: _State, kernel: object, stride: object, padding: object,
            dilation: object = 1) -> _State:
    """A sliding window over the last two dims (convolution, pooling)."""
    k, d = _pair(kernel), _pair(dilation)
    s = k if stride is None or stride == () or stride == [] else _pair(stride)
    if padding == "valid":
        p = (0, 0)
    elif padding == "same":  # PyTorch puts the odd pixel of 'same' padding on the right
        p = (d[0] * (k[0] - 1) // 2, d[1] * (k[1] - 1) // 2)
    else:
        p = _pair(padding)
    axes = {}
    for label, ki, si, pi, di in zip(x.layout[-2:], k, s, p, d):
        if label is None:
            if (ki, si, pi) != (1, 1, 0):
                return _unknown(f"{_describe(ctx)} over a non-spatial dim at {ctx.where}")
            continue
        axes[label] = getattr(x, label).conv(ki, si, pi, di)
    return replace(x, **axes)


_POINTWISE = (
    nn.modules.batchnorm._BatchNorm, nn.Identity, nn.modules.dropout._DropoutNd, nn.ReLU,
    nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
    nn.Softsign, nn.LogSigmoid, nn.Threshold, nn.LocalResponseNorm, nn.ChannelShuffle,
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.hardtanh, F.elu, F.selu, F.celu, F.gelu,
    F.silu, F.mish, F.hardswish, F.hardsigmoid, F.leaky_relu, F.sigmoid, torch.sigmoid, F.tanh,
    torch.tanh, F.softplus, F.dropout, F.dropout2d, F.alpha_dropout, F.batch_norm, torch.clamp,
    torch.clip, torch.abs, torch.exp, torch.neg, operator.neg, torch.sqrt, torch.square,
    "torchvision.ops.stochastic_depth.stochastic_depth",
    *(f"Tensor.{m}" for m in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp",
                              "clamp_", "clip", "contiguous", "clone", "detach", "to", "float",
                              "half", "double", "bfloat16", "type_as", "abs", "exp", "neg",
                              "sqrt", "square")),
)


@_rule(*_POINTWISE)
def _pointwise(ctx: _Context, x: _State) -> _State:
    return x


@_rule(nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
def _spatial_statistics(ctx: _Context, x: _State) -> _State:
    # statistics over H and W: local path is pointwise, every pixel reaches every output
    return replace(x, via=x.via + (f"{_describe(ctx)} at {ctx.where}",))


@_rule(nn.Linear, nn.LayerNorm, F.layer_norm, F.linear)
def _last_dims(ctx: _Context, x: _State) -> _State:
    if isinstance(ctx.module, nn.LayerNorm) or ctx.node.target is F.layer_norm:
        shape = ctx.module.normalized_shape if ctx.module is not None \
            else ctx.bind(("input", "normalized_shape"))["normalized_shape"]
        if any(x.layout[-(1 if isinstance(shape, int) else len(shape)):]):
            return replace(x, via=x.via + (f"{_describe(ctx)} at {ctx.where}",))
        return x  # normalises channels only (ConvNeXt): pointwise in space
    if x.layout[-1] is not None:
        return _unknown(f"{_describe(ctx)} over a spatial dim at {ctx.where}")
    return x


@_rule(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax)
def _softmax(ctx: _Context, x: _State) -> _State:
    dim = ctx.module.dim if ctx.module is not None else ctx.bind(("input", "dim"))["dim"]
    if dim is not None and x.layout[_dim(dim, len(x.layout))] is None:
        return x
    return replace(x, via=x.via + (f"{_describe(ctx)} at {ctx.where}",))


@_rule(nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)
def _window_module(ctx: _Context, x: _State) -> _State:
    m = ctx.module
    out = _window(ctx, x, m.kernel_size, m.stride, m.padding, getattr(m, "dilation", 1))
    if getattr(m, "padding_mode", "zeros") == "circular" and out.kind == "spatial":
        # same window; units at the border also see the opposite border
        out = replace(out, notes=out.notes + (f"circular padding at {ctx.where} wraps around",))
    return out


@_rule(F.conv2d, torch.conv2d)
def _conv_function(ctx: _Context, x: _State) -> _State:
    a = ctx.bind(("input", "weight", "bias", "stride", "padding", "dilation"),
                 stride=1, padding=0, dilation=1)
    kernel = ctx.shape(a["weight"])[-2:]
    return _window(ctx, x, kernel, a["stride"], a["padding"], a["dilation"])


@_rule(F.max_pool2d, F.avg_pool2d)
def _pool_function(ctx: _Context, x: _State) -> _State:
    names = ("input", "kernel_size", "stride", "padding")
    a = ctx.bind(names + (("dilation",) if ctx.node.target is F.max_pool2d else ()),
                 stride=None, padding=0, dilation=1)
    return _window(ctx, x, a["kernel_size"], a["stride"], a["padding"], a["dilation"])


@_rule(nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
def _adaptive_pool(ctx: _Context, x: _State) -> _State:
    src, out = ctx.shape(ctx.node.args[0]), ctx.shape(ctx.node)
    out = out[0] if isinstance(out, list) else out  # (values, indices)
    (hi, wi), (ho, wo) = src[-2:], out[-2:]
    if (hi, wi) == (ho, wo):
        return x
    if (ho, wo) == (1, 1):
        return _State("global", reason=ctx.where)
    if hi % ho == 0 and wi % wo == 0:  # uniform bins at this input size: an ordinary pool
        return _window(ctx, x, (hi // ho, wi // wo), (hi // ho, wi // wo), 0)
    return _unknown(f"{_describe(ctx)} with uneven bins ({hi}x{wi} -> {ho}x{wo}) at {ctx.where}")


@_rule(torch.mean, torch.sum, torch.amax, torch.amin, "Tensor.mean", "Tensor.sum", "Tensor.amax",
       "Tensor.amin")
def _reduce(ctx: _Context, x: _State) -> _State:
    a = ctx.bind(("input", "dim", "keepdim"), dim=None, keepdim=False)
    rank = len(x.layout)
    dims = range(rank) if a["dim"] is None else \
        [_dim(d, rank) for d in ((a["dim"],) if isinstance(a["dim"], int) else a["dim"])]
    labels = {x.layout[d] for d in dims} - {None}
    if labels == {"h", "w"}:
        return _State("global", reason=ctx.where)
    if labels:
        return _unknown(f"{_describe(ctx)} over one spatial dim at {ctx.where}")
    layout = x.layout if a["keepdim"] else tuple(l for i, l in enumerate(x.layout) if i not in dims)
    return replace(x, layout=layout)


@_rule(torch.flatten, "Tensor.flatten", nn.Flatten)
def _flatten(ctx: _Context, x: _State) -> _State:
    if ctx.module is not None:
        start, end = ctx.module.start_dim, ctx.module.end_dim
    else:
        a = ctx.bind(("input", "start_dim", "end_dim"), start_dim=0, end_dim=-1)
        start, end = a["start_dim"], a["end_dim"]
    rank = len(x.layout)
    start, end = _dim(start, rank), _dim(end, rank)
    merged = x.layout[start:end + 1]
    if len(merged) > 1 and any(merged):
        return _unknown(f"{_describe(ctx)} of spatial dims at {ctx.where}")
    return replace(x, layout=x.layout[:start] + merged[:1] + x.layout[end + 1:])


@_rule(torch.reshape, "Tensor.view", "Tensor.reshape")
def _reshape(ctx: _Context, x: _State) -> _State:
    src, out = ctx.shape(ctx.node.args[0]), ctx.shape(ctx.node)
    if tuple(src) == tuple(out):
        return x
    # row-major reshapes that keep the trailing (H, W) dims keep every spatial slab intact
    if x.layout[-2:] in (("h", "w"), ("w", "h")) and not any(x.layout[:-2]) \
            and tuple(src[-2:]) == tuple(out[-2:]):
        return replace(x, layout=(None,) * (len(out) - 2) + x.layout[-2:])
    return _unknown(f"{_describe(ctx)} of spatial dims at {ctx.where}")


@_rule(torch.permute, "Tensor.permute", torch.transpose, "Tensor.transpose")
def _permute(ctx: _Context, x: _State) -> _State:
    args, rank = ctx.node.args, len(x.layout)
    if "transpose" in _describe(ctx):
        a = ctx.bind(("input", "dim0", "dim1"))
        order = list(range(rank))
        i, j = _dim(a["dim0"], rank), _dim(a["dim1"], rank)
        order[i], order[j] = order[j], order[i]
    else:
        dims = ctx.node.kwargs.get("dims", args[1] if len(args) == 2 else args[1:])
        order = [_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    return replace(x, layout=tuple(x.layout[d] for d in order))


@_rule(F.pad)
def _pad(ctx: _Context, x: _State) -> _State:
    pad = ctx.bind(("input", "pad"))["pad"]
    axes = {}
    for i in range(len(pad) // 2):
        label = x.layout[-1 - i]
        if label is not None:
            ax = getattr(x, label)
            axes[label] = RFAxis(ax.size, ax.jump, ax.start - pad[2 * i] * ax.jump)
    return replace(x, **axes)


@_rule(torch.split, torch.chunk, "Tensor.split", "Tensor.chunk")
def _split(ctx: _Context, x: _State) -> _State:
    dim = ctx.bind(("input", "size", "dim"), dim=0)["dim"]
    if x.layout[_dim(dim, len(x.layout))] is not None:
        return _unknown(f"{_describe(ctx)} along a spatial dim at {ctx.where}")
    return x  # each element of the result has this state


@_rule(operator.getitem)
def _getitem(ctx: _Context, x: _State) -> _State:
    src, index = ctx.node.args
    if isinstance(ctx.shape(src), list):  # an element of a tuple / list output
        return x
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index):
        at = index.index(Ellipsis)
        fill = len(x.layout) - sum(i is not None for i in index if i is not Ellipsis)
        index = index[:at] + (slice(None),) * fill + index[at + 1:]
    layout, dim = [], 0
    for i in index:
        if i is None:
            layout.append(None)
            continue
        label = x.layout[dim]
        if label is not None and i != slice(None):
            return _unknown(f"indexing of a spatial dim at {ctx.where}")
        if isinstance(i, slice):
            layout.append(label)
        elif not isinstance(i, int):
            return _unknown(f"advanced indexing at {ctx.where}")
        dim += 1
    return replace(x, layout=tuple(layout) + x.layout[dim:])


@_rule(getattr, "Tensor.size", "Tensor.dim", "Tensor.numel", unary=False)
def _metadata(ctx: _Context) -> _State:
    if ctx.node.target is getattr and ctx.node.args[1] not in ("shape", "dtype", "device", "ndim"):
        return _unknown(f"attribute {ctx.node.args[1]!r} at {ctx.where}")
    return _CONST  # shapes and dtypes carry no pixel values


_GATES = (operator.mul, operator.imul, torch.mul, "Tensor.mul", "Tensor.mul_")


@_rule(operator.add, operator.iadd, operator.sub, operator.isub, operator.truediv,
       operator.itruediv, torch.add, torch.sub, torch.div, torch.maximum, torch.minimum,
       "Tensor.add", "Tensor.add_", "Tensor.sub", "Tensor.sub_", "Tensor.div", "Tensor.div_",
       *_GATES, unary=False)
def _merge_rule(ctx: _Context) -> _State:
    node = ctx.node
    gate = node.target in _GATES or f"Tensor.{node.target}" in _GATES
    return _merge(ctx, list(node.args[:2]) + [v for k, v in node.kwargs.items() if k == "other"],
                  gate)


@_rule(torch.cat, torch.concat, unary=False)
def _cat(ctx: _Context) -> _State:
    a = ctx.bind(("tensors", "dim"), dim=0)
    merged = _merge(ctx, list(a["tensors"]), gate=False)
    if merged.kind == "spatial" and merged.layout[_dim(a["dim"], len(merged.layout))] is not None:
        return _unknown(f"cat along a spatial dim at {ctx.where}")
    return merged


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


# -- empirical cross-check ---------------------------------------------------------------------
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

    x = torch.ones(1, in_channels, h, w, dtype=torch.float64, requires_grad=True)
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
