"""One receptive-field rule per layer type, registered with ``@_rule`` (module types, functions,
``"Tensor.<method>"`` names or qualified function names).

A rule maps the propagation state of a node's input to the state of its output: windows
(convolution, pooling) grow the field, pointwise ops keep it, reductions over H and W make it
global, layout ops (reshape, permute, indexing) move the H and W labels, merges (add, mul, cat)
defer to :func:`~featlab.receptive_field.arithmetic._merge`. Importing this module fills the
registry that :func:`~featlab.receptive_field.graph_receptive_fields` consults; the package
``__init__`` imports it for that reason.
"""

from __future__ import annotations

import operator
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from featlab.receptive_field.arithmetic import (_CONST, RFAxis, _Context, _State, _describe, _merge,
                                                _rule, _unknown)


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
    kernel = ctx.sizes(a["weight"])[0][-2:]
    return _window(ctx, x, kernel, a["stride"], a["padding"], a["dilation"])


@_rule(F.max_pool2d, F.avg_pool2d)
def _pool_function(ctx: _Context, x: _State) -> _State:
    names = ("input", "kernel_size", "stride", "padding")
    a = ctx.bind(names + (("dilation",) if ctx.node.target is F.max_pool2d else ()),
                 stride=None, padding=0, dilation=1)
    return _window(ctx, x, a["kernel_size"], a["stride"], a["padding"], a["dilation"])


@_rule(nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d)
def _adaptive_pool(ctx: _Context, x: _State) -> _State:
    src, out = ctx.sizes(ctx.node.args[0], ctx.node)
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
    src, out = ctx.sizes(ctx.node.args[0], ctx.node)
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
