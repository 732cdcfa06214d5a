"""Segmentation heads on a backbone's last features plus at most one skip connection.

The *baseline* is FCN-32s style: a 1x1 classifier on the last point's features, bilinearly
upsampled to the label size. A *single-skip* head adds one branch on the features of one skip
point ``s``:

- ``fusion="sum"`` (FCN score fusion): a 1x1 classifier on ``s``'s features gives scores on
  ``s``'s grid that are added to the baseline's scores.
- ``fusion="concat"`` (decoder style): the baseline's scores upsampled to ``s``'s grid are
  concatenated with ``s``'s features, a 3x3 conv + ReLU mixes them and a 1x1 classifier gives the
  scores added on ``s``'s grid.

Both are written as a residual on the baseline, ``up(base) + up(branch)`` (``up`` = bilinear to
the label size): for ``sum`` that is FCN's ``up(up_s(base) + branch)`` with the two bilinear
steps of ``base`` merged into one, so that a skip branch whose last layer starts at zero makes
the skip head start *exactly* as the baseline (same outputs bit for bit at initialisation), and
any gain is learnt. Features are standardised per channel with fixed statistics of the training
features (:meth:`SegHead.set_input_stats`), so one learning rate suits every point.

Examples:
    >>> import torch
    >>> head = SegHead("layer4", 32, 3, skip="layer2", skip_channels=8, fusion="concat")
    >>> feats = {"layer4": torch.randn(2, 32, 2, 2), "layer2": torch.randn(2, 8, 8, 8)}
    >>> head(feats, (32, 32)).shape
    torch.Size([2, 3, 32, 32])
    >>> base = SegHead("layer4", 32, 3)
    >>> _ = base.load_state_dict(head.state_dict(), strict=False)
    >>> torch.equal(head(feats, (32, 32)), base(feats, (32, 32)))  # skip starts as baseline
    True
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featlab.errors import ConfigError

log = logging.getLogger("featlab")

__all__ = ["SegHead", "FrozenBackbone", "FUSIONS", "upsample"]

FUSIONS = ("sum", "concat")


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of ``[N, C, h, w]`` to ``size`` (no-op when already that size).

    Under ``torch.use_deterministic_algorithms`` the same weights are applied as two matrix
    products, whose gradients are deterministic (``interpolate``'s CUDA backward is not, and
    raises in that mode); the values agree with ``interpolate`` to float rounding.
    """
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    if torch.are_deterministic_algorithms_enabled():
        rows = _bilinear_weights(x.shape[-2], size[0], x.dtype, x.device)
        cols = _bilinear_weights(x.shape[-1], size[1], x.dtype, x.device)
        return rows @ x @ cols.T
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@functools.lru_cache(maxsize=32)
def _bilinear_weights(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device
                      ) -> torch.Tensor:
    """``[n_out, n_in]`` weights of ``interpolate(mode="bilinear", align_corners=False)``
    along one axis: source ``(o + 0.5) * n_in / n_out - 0.5``, clamped at 0, between its two
    neighbours (the last one repeated at the edge). Made once per shape and device, not at
    every step (read-only: only matrix products use them)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    low = src.floor().long().clamp(max=n_in - 1)
    high = (low + 1).clamp(max=n_in - 1)
    frac = src - low
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    w[torch.arange(n_out), low] += 1 - frac
    w[torch.arange(n_out), high] += frac
    return w.to(device=device, dtype=dtype)


class _Standardize(nn.Module):
    """``(x - mean) / std`` per channel with fixed buffers (identity until stats are set)."""

    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(1, channels, 1, 1))
        self.register_buffer("std", torch.ones(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.mean.dtype) - self.mean) / self.std


class SegHead(nn.Module):
    """Baseline (``skip=None``) or single-skip segmentation head over captured features.

    Args:
        last: name of the last point (the backbone's final features).
        last_channels: its channel count.
        num_classes: output classes.
        skip: name of the skip point (None: the baseline).
        skip_channels: the skip point's channel count (required with ``skip``).
        fusion: ``"sum"`` or ``"concat"`` (see the module docstring).
        mid_channels: width of the 3x3 conv of the ``concat`` fusion.

    ``forward(features, size)`` takes a mapping ``point name -> [N, C, h, w]`` and returns logits
    ``[N, num_classes, *size]``.
    """

    def __init__(self, last: str, last_channels: int, num_classes: int, *,
                 skip: str | None = None, skip_channels: int | None = None,
                 fusion: str = "sum", mid_channels: int = 64):
        super().__init__()
        if fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}; got {fusion!r}. "
                              "Fix: --fusion sum or --fusion concat.")
        if skip is not None and skip == last:
            raise ConfigError(f"the skip point must differ from the last point {last!r}; got "
                              f"skip={skip!r}. Fix: omit --skip for the baseline.")
        if skip is not None and not (isinstance(skip_channels, int) and skip_channels > 0):
            raise ConfigError(f"skip_channels must be a positive int with skip={skip!r}; got "
                              f"{skip_channels!r}.")
        self.last, self.skip, self.fusion = last, skip, fusion
        self.num_classes = num_classes
        self.norm_last = _Standardize(last_channels)
        self.classifier = nn.Conv2d(last_channels, num_classes, 1)
        if skip is not None:
            self.norm_skip = _Standardize(skip_channels)
            if fusion == "sum":
                self.branch = nn.Conv2d(skip_channels, num_classes, 1)
                last_layer = self.branch
            else:
                self.branch = nn.Sequential(
                    nn.Conv2d(skip_channels + num_classes, mid_channels, 3, padding=1),
                    nn.ReLU(inplace=True), nn.Conv2d(mid_channels, num_classes, 1))
                last_layer = self.branch[2]
            with torch.no_grad():  # the skip head starts as the baseline
                last_layer.weight.zero_()
                last_layer.bias.zero_()

    @property
    def points(self) -> list[str]:
        """The points the head reads, last point first."""
        return [self.last] + ([self.skip] if self.skip else [])

    def set_input_stats(self, stats: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Fix the per-channel ``(mean, std)`` (1-D tensors) used to standardise each point."""
        for name, norm in ((self.last, self.norm_last), (self.skip, getattr(self, "norm_skip",
                                                                              None))):
            if name is None:
                continue
            mean, std = (torch.as_tensor(v, dtype=torch.float32).reshape(1, -1, 1, 1)
                         for v in stats[name])
            norm.mean.copy_(mean)
            norm.std.copy_(std.clamp_min(1e-6))

    def forward(self, features: Mapping[str, torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        base = self.classifier(self.norm_last(features[self.last]))
        out = upsample(base, size)
        if self.skip is None:
            return out
        s = self.norm_skip(features[self.skip])
        if self.fusion == "sum":
            extra = self.branch(s)
        else:
            extra = self.branch(torch.cat([upsample(base, s.shape[-2:]), s], 1))
        return out + upsample(extra, size)


class FrozenBackbone(nn.Module):
    """A backbone that stays frozen: eval mode always, no gradients, features via capture.

    ``train()`` keeps it in eval mode (so batch-norm running statistics never move, R-8.1) and
    every parameter has ``requires_grad=False``. Calling it returns ``{point: features}``.

    Examples:
        >>> import featlab.testing as ft
        >>> fb = FrozenBackbone(ft.TinyResNet(), ["layer1.0", "layer1.1"]).train()
        >>> fb.training, fb.model.training, any(p.requires_grad for p in fb.parameters())
        (False, False, False)
        >>> fb(ft.random_images(2, 32))["layer1.1"].shape
        torch.Size([2, 16, 8, 8])
    """

    def __init__(self, model: nn.Module, points: Sequence[str]):
        super().__init__()
        self.model, self.points = model, list(points)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> FrozenBackbone:
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from featlab.capture import capture

        with capture(self.model, self.points) as acts:
            self.model(x)
        return {name: acts[name] for name in self.points}


def finetune_features(model: nn.Module, points: Sequence[str], x: torch.Tensor
                      ) -> dict[str, torch.Tensor]:
    """Features of ``points`` with gradients to the backbone, in the model's own mode."""
    from featlab.capture import capture

    with capture(model, list(points), detach=False, eval=False) as acts:
        model(x)
    return {name: acts[name] for name in points}
