"""CKA similarity between skip points: linear, RBF and minibatch (unbiased HSIC) (R-3).

Centred kernel alignment compares two representations of the same samples,
``CKA(K, L) = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``:

* ``linear`` (Kornblith et al. 2019): K = X X^T. Computed in the *feature form*
  ``||Y^T X||_F^2`` (centred X, Y) when the features are narrower than the samples, else in the
  *Gram form* ``<HKH, HLH>``; both agree to ~1e-12. ``estimator="debiased"`` uses the unbiased
  HSIC estimator of Song et al. (2012) instead (near 0 for independent data).
* ``rbf``: K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma = ``bandwidth`` x the median
  distance between distinct samples. Gram form only (n x n per point).
* ``minibatch`` (Nguyen, Raghu & Kornblith 2021): linear kernel, unbiased HSIC per batch,
  averaged over a fixed, seeded set of batches (>= 4 samples each), so memory depends on the
  batch size only, not on N, and the result does not depend on the order of the batches.

Numerics: features are cast to float64 before any product (float16 caches included); every
point's statistics (centred features, Gram matrix, row norms) are computed once and all L x L
pairs come from one matrix product per point. Values agree with a plain float64 reference to
~1e-12 (tested to 1e-6). A value is NaN only with a named reason in ``nan_reasons``:
``zero_variance`` (a constant representation) or ``negative_hsic`` (the unbiased self-HSIC of
a point came out <= 0, possible for tiny samples).

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> x = rng.normal(size=(100, 8))
    >>> round(linear_cka(x, x), 6), round(linear_cka(x, 3 * x @ np.linalg.qr(
    ...     rng.normal(size=(8, 8)))[0]), 6)
    (1.0, 1.0)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from featlab.analysis._cka_estimators import hsic_from_stats, pair_stats
from featlab.analysis._io import check_keys, write_json_csv
from featlab.analysis._representations import batch_plan
from featlab.errors import ConfigError

logger = logging.getLogger("featlab")

__all__ = ["linear_cka", "rbf_cka", "minibatch_cka", "cka_arrays", "cka_matrix", "CKAResult",
           "write_result", "KINDS"]

KINDS = ("linear", "rbf", "minibatch")
_MAX_BYTES = 8 << 30   # CKA's memory cap where the available memory cannot be read


def _as_matrix(x: Any, what: str, device: torch.device | str = "cpu") -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x)
    if t.ndim != 2 or t.shape[0] < 2:
        raise ConfigError(f"{what} must be a [n, d] matrix with n >= 2 samples; got shape "
                          f"{tuple(t.shape)}. Fix: pool or flatten feature maps first "
                          "(e.g. x.mean((2, 3))).")
    return t.detach().to(device=device, dtype=torch.float64)


def _check_n(xs: Sequence[torch.Tensor]) -> None:
    ns = {x.shape[0] for x in xs}
    if len(ns) != 1:
        raise ConfigError(f"representations compared by CKA must describe the same samples; got "
                          f"sample counts {sorted(ns)}. Fix: use the same images (and "
                          "positions) for every point.")


def _ratio(hab: torch.Tensor, haa: torch.Tensor, hbb: torch.Tensor, const_a: list[bool],
           const_b: list[bool], names_a: list[str], names_b: list[str]
           ) -> tuple[np.ndarray, dict[str, str]]:
    """CKA = hab / sqrt(haa hbb) with NaN (and a named reason) where it is undefined."""
    reasons: dict[str, str] = {}
    bad_a = np.zeros(len(names_a), bool)
    bad_b = np.zeros(len(names_b), bool)
    for bad, const, h, names, side in ((bad_a, const_a, haa, names_a, "rows"),
                                       (bad_b, const_b, hbb, names_b, "columns")):
        for i, name in enumerate(names):
            if const[i]:
                bad[i], reasons[f"{side}/{name}"] = True, "zero_variance"
            elif float(h[i]) <= 0:
                bad[i], reasons[f"{side}/{name}"] = True, "negative_hsic"
    denom = torch.sqrt(haa.clamp_min(0)[:, None] * hbb.clamp_min(0)[None, :])
    m = (hab / denom).cpu().numpy()
    m[bad_a, :] = np.nan
    m[:, bad_b] = np.nan
    return m, reasons


def cka_arrays(xs: Sequence[Any], ys: Sequence[Any] | None = None, *, kernel: str = "linear",
               estimator: str = "biased", form: str = "auto", bandwidth: float = 1.0,
               device: torch.device | str = "cpu", names: Sequence[str] | None = None,
               names2: Sequence[str] | None = None) -> tuple[np.ndarray, dict[str, str], str]:
    """CKA of every pair of representations in one pass (each one's statistics once).

    Args:
        xs: ``[n, d_i]`` matrices (numpy or torch, any float dtype), same n.
        ys: a second list for a cross matrix (``len(xs) x len(ys)``); None for ``xs`` x ``xs``.
        kernel: ``"linear"`` or ``"rbf"``.
        estimator: ``"biased"`` (Kornblith et al.) or ``"debiased"`` (unbiased HSIC).
        form: linear only: ``"feature"``, ``"gram"`` or ``"auto"``.
        bandwidth: RBF sigma as a fraction of the median distance.
        device: where the float64 products run.
        names, names2: labels used in ``nan_reasons`` (default ``"0"``, ``"1"``, ...).

    Returns:
        ``(matrix, nan_reasons, form used)``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> a, b = rng.normal(size=(50, 4)), rng.normal(size=(50, 6))
        >>> m, reasons, form = cka_arrays([a, b])
        >>> m.shape, float(m[0, 0]), form, reasons
        ((2, 2), 1.0, 'feature', {})
    """
    xs = [_as_matrix(x, "xs[i]", device) for x in xs]
    ys = None if ys is None else [_as_matrix(y, "ys[j]", device) for y in ys]
    if not xs or (ys is not None and not ys):
        raise ConfigError("CKA needs at least one representation on each side; got none.")
    _check_n(xs + (ys or []))
    names = [str(i) for i in range(len(xs))] if names is None else list(names)
    names2 = (names if ys is None else [str(j) for j in range(len(ys))]) if names2 is None \
        else list(names2)
    stats = pair_stats(xs, ys, kernel=kernel, form=form, bandwidth=bandwidth)
    hab, haa, hbb = hsic_from_stats(stats, estimator)
    m, reasons = _ratio(hab, haa, hbb, stats.constant_a, stats.constant_b, names, names2)
    return m, reasons, stats.form


def linear_cka(x: Any, y: Any, *, estimator: str = "biased", form: str = "auto") -> float:
    """Linear CKA of two ``[n, d]`` representations of the same n samples, in float64.

    Examples:
        >>> rng = np.random.default_rng(1)
        >>> x = rng.normal(size=(64, 5))
        >>> abs(linear_cka(x, x, form="gram") - linear_cka(x, x, form="feature")) < 1e-12
        True
    """
    return float(cka_arrays([x], [y], estimator=estimator, form=form)[0][0, 0])


def rbf_cka(x: Any, y: Any, *, bandwidth: float = 1.0, estimator: str = "biased") -> float:
    """RBF CKA; sigma = ``bandwidth`` x the median distance between distinct samples.

    Examples:
        >>> x = np.random.default_rng(2).normal(size=(40, 3))
        >>> round(rbf_cka(x, 2 * x, bandwidth=0.5), 6)
        1.0
    """
    if not (isinstance(bandwidth, (int, float)) and bandwidth > 0):
        raise ConfigError(f"bandwidth must be a number > 0 (a fraction of the median distance); "
                          f"got {bandwidth!r}. Fix: e.g. 0.5 or 1.0.")
    return float(cka_arrays([x], [y], kernel="rbf", estimator=estimator,
                            bandwidth=float(bandwidth))[0][0, 0])


class MinibatchAccumulator:
    """Sums of unbiased HSIC over minibatches for all pairs (Nguyen et al. 2021).

    ``update(xs, ys=None)`` adds one batch (lists of ``[b, d_i]`` matrices, b >= 4); the
    result is a sum, so it does not depend on the order of the batches.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = device
        self.hab = self.haa = self.hbb = None
        self.const_a: list[bool] | None = None
        self.const_b: list[bool] | None = None
        self.batches = 0
        self.form: str | None = None

    def update(self, xs: Sequence[Any], ys: Sequence[Any] | None = None, form: str = "auto"
               ) -> None:
        xs = [_as_matrix(x, "xs[i]", self.device) for x in xs]
        ys = None if ys is None else [_as_matrix(y, "ys[j]", self.device) for y in ys]
        _check_n(xs + (ys or []))
        if xs[0].shape[0] < 4:
            raise ConfigError(f"every minibatch must hold >= 4 samples; got {xs[0].shape[0]}.")
        stats = pair_stats(xs, ys, form=form)
        hab, haa, hbb = hsic_from_stats(stats, "debiased")
        if self.hab is None:
            self.hab, self.haa, self.hbb = hab, haa, hbb
            self.const_a, self.const_b = list(stats.constant_a), list(stats.constant_b)
        else:
            self.hab, self.haa, self.hbb = self.hab + hab, self.haa + haa, self.hbb + hbb
            # a point is constant only if it is constant in every batch
            self.const_a = [a and b for a, b in zip(self.const_a, stats.constant_a)]
            self.const_b = [a and b for a, b in zip(self.const_b, stats.constant_b)]
        self.batches += 1
        self.form = stats.form

    def result(self, names: Sequence[str], names2: Sequence[str]
               ) -> tuple[np.ndarray, dict[str, str]]:
        if self.hab is None:
            raise ConfigError("minibatch CKA needs at least one batch; got none.")
        return _ratio(self.hab, self.haa, self.hbb, self.const_a, self.const_b, list(names),
                      list(names2))


def minibatch_cka(x: Any, y: Any, *, batch_size: int = 256, seed: int = 0) -> float:
    """Minibatch linear CKA of two ``[n, d]`` arrays with fixed, seeded batches.

    Examples:
        >>> x = np.random.default_rng(3).normal(size=(64, 4))
        >>> round(minibatch_cka(x, x, batch_size=16), 6)
        1.0
    """
    x, y = np.asarray(x), np.asarray(y)
    acc = MinibatchAccumulator()
    for rows in batch_plan(len(x), batch_size, seed):
        acc.update([x[rows]], [y[rows]])
    return float(acc.result(["x"], ["y"])[0][0, 0])


@dataclass(frozen=True, eq=False)
class CKAResult:
    """An L x M CKA matrix between skip points, with what made it.

    Attributes:
        names: row points (execution order); ``columns``: column points (``names`` within one
            cache, the second cache's points across models).
        matrix: ``[len(names), len(columns)]`` float64, NaN only where ``nan_reasons`` says.
        kind, estimator, spatial, form: the estimator settings (see the module docstring).
        num_samples: rows of each representation (images, or images x positions).
        num_images: images used.
        settings: seed, batch_size, positions, bandwidth, alignment (pixels).
        nan_reasons: ``{"rows/<point>" or "columns/<point>": "zero_variance" | "negative_hsic"}``.
        cache, cache2: identity of the input caches (path, ids_sha256, ...), or None.
        versions: featlab / torch / numpy versions.
    """

    names: list[str]
    columns: list[str]
    matrix: np.ndarray
    kind: str
    estimator: str
    spatial: str
    form: str
    num_samples: int
    num_images: int
    settings: dict = field(default_factory=dict)
    nan_reasons: dict = field(default_factory=dict)
    cache: dict | None = None
    cache2: dict | None = None
    versions: dict = field(default_factory=dict)


    def __repr__(self) -> str:  # one line: the numbers are .matrix
        return (f"CKAResult({self.kind} {self.estimator}, {self.spatial}: "
                f"{len(self.names)} x {len(self.columns)} over {self.num_samples} samples)")

    def value(self, a: str, b: str) -> float:
        """CKA between row point ``a`` and column point ``b``."""
        return float(self.matrix[self.names.index(a), self.columns.index(b)])

    def rows(self) -> list[dict]:
        """One dict per row point: ``{"point": name, <column point>: CKA, ...}`` (NaN -> None).

        Column keys of a cross-model result are prefixed ``"b:"``.
        """
        prefix = "" if self.cache2 is None else "b:"
        return [{"point": name, **{prefix + c: (None if np.isnan(v) else float(v))
                                   for c, v in zip(self.columns, row)}}
                for name, row in zip(self.names, self.matrix)]

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in _RESULT_KEYS}
        d["matrix"] = [[None if np.isnan(v) else float(v) for v in row] for row in self.matrix]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> CKAResult:
        check_keys("CKAResult", d, _RESULT_KEYS)
        d = dict(d)
        d["matrix"] = np.array([[np.nan if v is None else v for v in row] for row in d["matrix"]],
                               dtype=np.float64).reshape(len(d["names"]), len(d["columns"]))
        return cls(**d)


_RESULT_KEYS = ("names", "columns", "matrix", "kind", "estimator", "spatial", "form",
                "num_samples", "num_images", "settings", "nan_reasons", "cache", "cache2",
                "versions")


def write_result(result: CKAResult, stem, *, force: bool = False) -> list:
    """Write ``<stem>.json`` (:meth:`CKAResult.to_dict`) and ``<stem>.csv`` (:meth:`rows`)."""
    return write_json_csv(result.to_dict(), result.rows(), stem, force=force)



def cka_matrix(cache: Any, cache2: Any = None, kind: str = "linear", **kwargs: Any
               ) -> CKAResult:
    """CKA between the skip points of a cache (or across two caches of the same samples).

    Args:
        cache: a :class:`~featlab.cache.reader.CacheReader` or a cache path.
        cache2: a second cache of the same samples (checked by their id fingerprints) for a
            cross-model matrix (rows: ``cache``'s points, columns: ``cache2``'s).
        kind: ``"linear"``, ``"rbf"`` or ``"minibatch"``.
        **kwargs: ``points``, ``points2`` (selections; default all stored points),
            ``spatial`` (``"gap"`` default, ``"flatten"``, ``"pixels"``), ``estimator``
            (``"biased"`` default for linear / rbf; minibatch is always ``"debiased"``),
            ``form``, ``bandwidth`` (rbf, default 1.0), ``batch_size`` (minibatch, default
            256), ``positions`` (pixels per image, default 16), ``seed`` (0), ``device``,
            ``progress``, ``max_bytes`` (memory allowed for the float64 representations: all
            samples' and their centred copies for the full kinds, one batch's for minibatch;
            default 80 % of the available memory, counting a cgroup limit).

    Returns:
        A :class:`CKAResult`.

    Examples:
        >>> result = cka_matrix("val.h5", kind="minibatch", batch_size=128)  # doctest: +SKIP
        >>> result.names, result.matrix.shape  # doctest: +SKIP
    """
    from featlab.analysis._cka_cache import cka_matrix as run  # the cache-aware part

    return run(cache, cache2, kind, **kwargs)
