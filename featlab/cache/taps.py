"""Forward hooks that pool, cast and copy each point straight into reusable host buffers.

Extraction cannot afford what :func:`featlab.capture` does for interactive use (a fresh tensor
per point and batch, cast and pooled afterwards): at a cache's scale that is several extra
passes over every activation and a stream of large allocations. Here each hook runs, on the
device that computed the point, ``index_select`` (when only some channels are stored),
``adaptive_avg_pool2d`` (when the point is pooled), the cast to the storage dtype and the copy
into a :class:`Slot` -- preallocated (pinned, on CUDA) host arrays that the writer thread
turns into HDF5 rows and hands back for reuse. The copy is taken inside the hook, so in-place
operations after the module (``ReLU(inplace=True)``, ``out += identity``) cannot change it; a
CUDA copy is queued on the stream before them.

The hooks also count non-finite values of the stored arrays and record the float16 rounding
error per sample (R-4.3), and check that each point's module ran exactly once. Hooks exist only
inside the ``with`` block of :class:`Taps`.

The rounding error is one of two statistics (``plan.ERROR_STATS``; float32 storage records 0):

* ``"bound"``: half the float16 spacing at the sample's largest stored magnitude -- the most
  that rounding can have changed any of its values (an exact bound, not an estimate). It
  depends only on the stored copy, so anyone can recompute it from the file; the hooks take the
  two reductions of the float32 output and round the results (the same bits, and faster).
* ``"exact"``: max |x - float32(stored)|, which needs the float32 values again: a copy back,
  a subtraction and two reductions per point: 6-7 % of a resnet18 forward on two CPU cores,
  against ~2 % for the bound (``benchmarks/README.md``).

Both are ``inf`` where a finite value overflowed float16, and measured over the finite values
otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featlab.cache.direct import aligned_empty
from featlab.errors import ConfigError, ReusedModuleError, SkipPointNotFiredError

__all__ = ["Slot", "Taps", "check_eval", "float16_error_bound", "rounding_error"]

_MIN_NORMAL = 2.0 ** -14  # smallest normal float16; below it the spacing is 2**-24


def float16_error_bound(max_abs: torch.Tensor) -> torch.Tensor:
    """Half the float16 spacing at ``max_abs`` (finite, float32): the largest error of rounding
    to float16 any value whose float16 copy is at most ``max_abs`` in magnitude.

    Examples:
        >>> float16_error_bound(torch.tensor([1.0, 1.5, 65504.0, 0.0]))
        tensor([4.8828e-04, 4.8828e-04, 1.6000e+01, 2.9802e-08])
    """
    _, exponent = torch.frexp(max_abs)  # max_abs = m * 2**exponent, 0.5 <= m < 1
    normal = torch.ldexp(torch.ones_like(max_abs), exponent - 12)
    return torch.where(max_abs >= _MIN_NORMAL, normal, torch.full_like(max_abs, 2.0 ** -25))


class Slot:
    """Host buffers for one batch, reused from batch to batch (memory does not grow with N).

    Attributes:
        points: per point, ``[B, C, h, w]`` in the storage dtype (``point_arrays``: numpy views).
        nonfinite, abs_error: ``[B, P]`` statistics.
        images: ``[B, 3, H, W]`` uint8, or None.
        start, n, runs, labels, event: the batch it holds now (rows ``start .. start + n`` of the
            file, the runs of rows still to write, the uint8 masks, a CUDA event to wait for).
    """

    def __init__(self, batch_size: int, shapes: Sequence[tuple[int, int, int]],
                 dtype: torch.dtype, input_size: tuple[int, int], save_images: bool, pin: bool):
        b, p = batch_size, len(shapes)
        # page-aligned: rows whose size lines up can be written with O_DIRECT from here
        self.points = [aligned_empty((b, *s), dtype, pin=pin) for s in shapes]
        self.point_arrays = [t.numpy() for t in self.points]
        self.nonfinite = torch.zeros((b, p), dtype=torch.int64, pin_memory=pin)
        self.abs_error = torch.zeros((b, p), dtype=torch.float32, pin_memory=pin)
        self.images = (torch.empty((b, 3, *input_size), dtype=torch.uint8, pin_memory=pin)
                       if save_images else None)
        self.start = 0
        self.n = 0
        self.runs: tuple[tuple[int, int], ...] = ()
        self.labels: np.ndarray | None = None
        self.event: torch.cuda.Event | None = None


class _Stop(Exception):
    """Raised by the deepest point's hook: nothing after it is needed (R-4.4)."""


class Taps:
    """Hooks on the modules of ``points`` that fill a :class:`Slot` during :meth:`run`.

    Args:
        root: the unwrapped model (the hooks go on its submodules).
        names: point names, in execution order (for messages).
        modules: module path of each point.
        shapes: the network's ``(C, H, W)`` of each point.
        stored: ``(h, w)`` stored for each point (pooled when smaller than ``H, W``).
        channels: the channels stored of each point, None for every one.
        dtype: storage dtype.
        error_stat: the float16 rounding error recorded, ``"bound"`` or ``"exact"``.
        stop_early: end the forward after the deepest point.
    """

    def __init__(self, root: nn.Module, names: Sequence[str], modules: Sequence[str],
                 shapes: Sequence[tuple[int, int, int]], stored: Sequence[tuple[int, int]],
                 channels: Sequence[Sequence[int] | None], dtype: torch.dtype, error_stat: str,
                 stop_early: bool = True):
        self._root = root
        self._names = list(names)
        self._modules = [root.get_submodule(m) for m in modules]
        self._shapes = [tuple(s) for s in shapes]
        self._stored = [tuple(s) for s in stored]
        self._pool = [tuple(st) != tuple(sh[1:]) for st, sh in zip(self._stored, self._shapes)]
        self._channels = [None if c is None else torch.tensor(c, dtype=torch.long)
                          for c in channels]
        self._dtype = dtype
        self._half = dtype == torch.float16
        self._exact = error_stat == "exact"
        self._stop_early = stop_early
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._slot: Slot | None = None
        self._n = 0
        self._counts = [0] * len(self._names)
        self._scratch = torch.empty(0)
        self._dev_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        # the bound on the host: each point's largest and smallest stored value per sample,
        # turned into bounds for every point at once after the forward
        self._bounds = self._half and not self._exact
        self._extremes = torch.empty((2, len(self._names), 0), dtype=torch.float16)
        self._raw = torch.empty((2, 0))  # one point's, in the dtype of its output

    def __enter__(self) -> Taps:
        try:
            for k, module in enumerate(self._modules):
                self._handles.append(module.register_forward_hook(self._make_hook(k)))
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._remove()

    def _remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def run(self, x: torch.Tensor, slot: Slot, n: int) -> None:
        """Forward ``x`` (``n`` samples) through the root module, filling ``slot``."""
        self._slot, self._n = slot, n
        self._counts = [0] * len(self._names)
        cuda = x.is_cuda
        p = len(self._names)
        if cuda:
            self._dev_stats = (torch.zeros((n, p), dtype=torch.int64, device=x.device),
                               torch.zeros((n, p), dtype=torch.float32, device=x.device))
        else:
            slot.nonfinite[:n] = 0  # the hooks count only in samples that have any
            if self._bounds and self._extremes.shape[2] < n:
                self._extremes = torch.empty((2, p, n), dtype=torch.float16)
        try:
            self._root(x)
        except _Stop:
            pass
        finally:
            self._slot = None
        silent = [name for name, c in zip(self._names, self._counts) if c == 0]
        if silent:
            raise SkipPointNotFiredError(
                f"every extracted point must run in the forward; got no call of "
                f"{', '.join(map(repr, silent))}. Fix: extract points that run for this input "
                "(see `featlab points`).")
        reused = [f"{name!r} ({c} calls)" for name, c in zip(self._names, self._counts) if c > 1]
        if reused:
            raise ReusedModuleError(f"each extracted point's module must run once per forward; "
                                    f"got {', '.join(reused)}. Fix: extract the enclosing block.")
        if cuda:
            nonfinite, abs_error = self._dev_stats
            slot.nonfinite[:n].copy_(nonfinite, non_blocking=True)
            slot.abs_error[:n].copy_(abs_error, non_blocking=True)
            self._dev_stats = None
        elif self._bounds:
            extremes = self._extremes[:, :, :n].float()
            largest = torch.maximum(extremes[0], -extremes[1]).T  # [n, P]; NaN where any is NaN
            finite = torch.isfinite(largest)
            bound = float16_error_bound(torch.where(finite, largest, 0.0))
            # samples with a NaN or inf already hold what the hook measured over their values
            error = slot.abs_error[:n]
            error.copy_(torch.where(finite, bound, error))

    def _make_hook(self, k: int):
        last = len(self._names) - 1

        def hook(module: nn.Module, args: object, output: object) -> None:
            slot = self._slot
            if slot is None:
                return  # a forward outside Taps.run (not ours to record)
            self._counts[k] += 1
            if self._counts[k] > 1:
                return  # reported once the forward is over
            self._store(k, output, slot)
            if self._stop_early and k == last:
                raise _Stop

        return hook

    def _store(self, k: int, output: object, slot: Slot) -> None:
        n = self._n
        expected = (n, *self._shapes[k])
        if not isinstance(output, torch.Tensor) or tuple(output.shape) != expected:
            got = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ConfigError(f"point {self._names[k]!r} must return a tensor {list(expected)} "
                              f"(as measured by skip_points at this input size); got {got}. "
                              "Fix: keep the input size of every sample the same.")
        t = output.detach()
        keep = self._channels[k]
        if keep is not None:  # the subset first: pooling and the cast then touch only it
            if keep.device != t.device:
                keep = self._channels[k] = keep.to(t.device)
            t = t.index_select(1, keep)
        if self._pool[k]:
            t = F.adaptive_avg_pool2d(t, self._stored[k])
        dst = slot.points[k][:n]
        if t.is_cuda:
            self._device_stats(k, t, dst)
        else:  # cast and copy into memory reused batch to batch
            self._host_stats(k, t, dst, slot)

    def _device_stats(self, k: int, t: torch.Tensor, dst: torch.Tensor) -> None:
        stored = t.to(self._dtype)
        dst.copy_(stored, non_blocking=True)  # queued before any later in-place op on `t`
        nonfinite, abs_error = self._dev_stats
        flat, x = stored.reshape(len(dst), -1), t.reshape(len(dst), -1)
        finite = torch.isfinite(flat)
        nonfinite[:, k] = (~finite).sum(1)
        if self._half:
            abs_error[:, k] = rounding_error(x, flat, finite, self._exact)

    def _host_stats(self, k: int, t: torch.Tensor, dst: torch.Tensor, slot: Slot) -> None:
        n = len(dst)
        flat = dst.reshape(n, -1)
        x = t.reshape(n, -1)
        flat.copy_(x)  # the cast and copy into memory reused batch after batch
        # Whole-batch operations into preallocated memory, with same-dtype operands and
        # amin/amax: the vectorised kernels, and few of them. (Per-sample or per-block loops
        # stay in the CPU cache but start many short parallel regions, which stall badly when
        # other processes share the cores; aminmax along a dim is a slow kernel.) A sample whose
        # statistic is not finite holds a NaN or inf somewhere: exact counts only for those.
        if self._bounds:
            # two reductions here; the bounds of all points are one pass after the forward.
            # Taken of the source and then rounded: rounding to float16 is monotone, so they are
            # the stored copy's extremes bit for bit, and the CPU reduces float32 ~3x faster
            # than float16 (resnet18 relu, batch 32: 0.42 against 1.23 ms)
            if self._raw.dtype != x.dtype or self._raw.shape[1] < n:
                self._raw = torch.empty((2, n), dtype=x.dtype)
            raw = self._raw[:, :n]
            torch.amax(x, 1, out=raw[0])
            torch.amin(x, 1, out=raw[1])
            extremes = self._extremes[:, k, :n]
            extremes.copy_(raw)
            # float32 sums of float16 values cannot overflow: not finite iff a NaN or inf
            if torch.isfinite(extremes.sum(dtype=torch.float32)):
                return
            finite = torch.isfinite(extremes).all(0)
        elif not self._half:
            slot.abs_error[:n, k] = 0.0
            # one pass: a sum is finite when every value is (an overflowing sum of finite values
            # only sends the sample to the exact count below)
            finite = torch.isfinite(flat.sum(1))
        else:
            if self._scratch.numel() < x.numel():
                self._scratch = torch.empty(x.numel(), dtype=torch.float32)
            diff = self._scratch[:x.numel()].view(n, -1)
            diff.copy_(flat)
            diff.sub_(x)
            # NaN - NaN, inf - inf are NaN; a finite x overflowing to inf gives inf
            err = torch.maximum(diff.amax(1), -diff.amin(1))
            slot.abs_error[:n, k] = err
            finite = torch.isfinite(err)
        for i in torch.nonzero(~finite).flatten().tolist():
            row = torch.isfinite(flat[i])
            slot.nonfinite[i, k] = int((~row).sum())
            if self._half:
                slot.abs_error[i, k] = rounding_error(x[i:i + 1], flat[i:i + 1], row[None],
                                                      self._exact)[0]


def rounding_error(x: torch.Tensor, stored: torch.Tensor, finite: torch.Tensor, exact: bool
                   ) -> torch.Tensor:
    """The float16 rounding error statistic per row of ``x`` ``[n, m]`` and its float16 copy
    ``stored`` (``finite``: ``isfinite(stored)``): whole-tensor operations without a host sync.
    ``inf`` where a finite value of ``x`` overflowed; the rest measured over finite values."""
    x_finite = torch.isfinite(x)
    if exact:
        x = x.float()
        return torch.where(x_finite, (x - stored.float()).abs(), 0.0).amax(1)
    largest = torch.where(finite, stored.abs(), 0.0).amax(1).float()
    overflow = (x_finite & ~finite).any(1)
    return torch.where(overflow, torch.inf, float16_error_bound(largest))


def check_eval(modules: Sequence[nn.Module], names: dict[int, str]) -> None:
    """Raise :class:`~featlab.errors.ModelModeError` if any module is in training mode."""
    training = [m for m in modules if m.training]
    if training:
        from featlab.errors import ModelModeError

        shown = ", ".join(repr(names.get(id(m), "?")) for m in training[:3])
        raise ModelModeError(
            f"every module must stay in eval mode during extraction; got {len(training)} in "
            f"training mode ({shown}{', ...' if len(training) > 3 else ''}): something switched "
            "the model to .train() while it ran (a hook, a framework callback). Fix: remove "
            "whatever calls .train(); extraction puts the model in eval mode itself.")
