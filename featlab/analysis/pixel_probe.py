"""``PixelProbe``: a per-pixel multinomial logistic-regression probe on frozen features.

A scikit-learn style estimator (``__init__`` stores hyper-parameters, ``fit`` returns self,
learned state ends with ``_``, ``score`` is higher-is-better) that accepts either

* image-shaped data: features ``[N, C, h, w]`` of one skip point and labels ``[N, H, W]``
  (255 = ignore). Logits are a 1x1 convolution on the native grid, upsampled bilinearly to the
  label size (labels are never resized); training uses the same model, on the bilinear features
  at a seeded sample of labelled pixels (see :mod:`featlab.analysis._pixels`). Inputs may be
  lazy arrays such as ``cache["layer3"]`` and ``cache.labels``: they are read ``batch_size``
  images at a time, so caches larger than memory stream; or
* plain pixel data: ``(n, C)`` features and ``(n,)`` labels.

The solver is full-batch L-BFGS in torch on ``device`` (scikit-learn's objective, see
:mod:`featlab.analysis._logreg`). When ``alpha`` is None it is chosen from ``alphas`` by mIoU on
held-out training images (a warm-started path from the strongest penalty down), and the probe
is refitted on all sampled pixels with the chosen value.

Examples:
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(4, 3, 4, 4)).astype("float32")   # [N, C, h, w]
    >>> y = (np.kron(X[:, 0], np.ones((2, 2))) > 0).astype("uint8")  # [N, 8, 8] labels
    >>> probe = PixelProbe(alpha=1e-4, device="cpu").fit(X, y)
    >>> probe.coef_.shape, probe.predict(X).shape, probe.score(X, y) > 0.8
    ((2, 3), (4, 8, 8), True)
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin

from featlab.analysis._logreg import IGNORE, fit_logreg, linear_logits
from featlab.analysis._pixels import as_tensor, batches, sample_pixels
from featlab.distributed import resolve_device
from featlab.errors import ConfigError

__all__ = ["PixelProbe", "IGNORE_INDEX"]

log = logging.getLogger("featlab")

IGNORE_INDEX = 255
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_PATH_PIXELS = 25_000  # pixels per side (fit / held out) while choosing alpha
_NEG = -1e4  # bias of a class never seen in training: never predicted, no inf/nan on upsampling


class PixelProbe(ClassifierMixin, BaseEstimator):
    """Per-pixel multinomial logistic regression (a linear / 1x1-conv probe).

    Args:
        alpha: L2 strength per sample (objective: weighted mean cross-entropy
            ``+ alpha / 2 * ||W||^2``; the intercept is not penalised). scikit-learn's
            ``LogisticRegression(C=1 / (alpha * n_pixels))`` solves the same problem. None:
            choose from ``alphas`` on held-out training data.
        alphas: candidates when ``alpha`` is None.
        holdout: share of training images (of pixels, for plain arrays) held out to choose
            ``alpha`` (the candidates are fitted on at most 25,000 of the remaining pixels and
            ranked on at most 25,000 held-out ones).
        standardize: scale every feature to zero mean and unit variance over the training
            pixels (folded into ``coef_``/``intercept_`` afterwards).
        class_weight: None or ``"balanced"`` (``n / (K * n_k)`` over the training pixels, as
            scikit-learn).
        max_pixels: training pixels kept (a uniform seeded sample of the non-ignored ones);
            None keeps all. Evaluation always uses every non-ignored pixel.
        num_classes: K; None infers ``max label + 1`` from the training labels.
        max_iter, tol: L-BFGS budget and gradient tolerance (max-abs, as scikit-learn's lbfgs).
        batch_size: images read at a time when streaming.
        device: ``"cpu"``, ``"cuda"``, ...; None: CUDA when available.
        dtype: solver precision, ``"float32"`` or ``"float64"``.
        shuffle_labels: train on spatially shuffled labels (the null baseline of R-10.3).
        seed: seeds the pixel sample, the held-out split and the label shuffle.
        progress: a progress bar while streaming.

    Attributes:
        coef_, intercept_: ``[K, C]`` and ``[K]`` in the original feature space.
        classes_: ``arange(K)``; predictions are class indices.
        alpha_: the L2 strength used; ``alpha_scores_``: held-out mIoU per candidate.
        mean_, scale_: the standardisation (zeros / ones when ``standardize=False``).
        n_pixels_, n_iter_, label_size_ (``(H, W)`` or None for plain data), fit_seconds_.
    """

    def __init__(self, alpha: float | None = None, *,
                 alphas: tuple[float, ...] = (1e-4, 1e-3, 1e-2), holdout: float = 0.2,
                 standardize: bool = True, class_weight: str | None = None,
                 max_pixels: int | None = 100_000, num_classes: int | None = None,
                 max_iter: int = 100, tol: float = 1e-4, batch_size: int = 16,
                 device: str | None = None, dtype: str = "float32",
                 shuffle_labels: bool = False, seed: int = 0, progress: bool = False):
        self.alpha = alpha
        self.alphas = alphas
        self.holdout = holdout
        self.standardize = standardize
        self.class_weight = class_weight
        self.max_pixels = max_pixels
        self.num_classes = num_classes
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.device = device
        self.dtype = dtype
        self.shuffle_labels = shuffle_labels
        self.seed = seed
        self.progress = progress

    # ---- fitting ----------------------------------------------------------------------------
    def fit(self, X: Any, y: Any) -> PixelProbe:
        """Fit on ``[N, C, h, w]`` + ``[N, H, W]`` (streamed) or ``(n, C)`` + ``(n,)`` data."""
        self._check_params()
        started = time.perf_counter()
        kind = _kind(X, y)
        if kind == "image":
            sample = sample_pixels(X, y, max_pixels=self.max_pixels, seed=self.seed,
                                   ignore_index=IGNORE_INDEX, batch_size=self.batch_size,
                                   shuffle_labels=self.shuffle_labels, progress=self.progress)
            Xp, yp, groups = sample.cells, sample.y, sample.image
            interp, stats = (sample.idx, sample.w), (sample.mean, sample.var)
            grid = (sample.grid, sample.label_map) if sample.grid is not None else None
            if grid is None and len(sample.cells) > len(sample.y):  # sparse, fine grid: rows
                Xp, interp, stats = sample.X, None, None
            max_label, self.label_size_ = sample.max_label, sample.label_size
        else:
            Xp, yp = _pixels(X, y, self.max_pixels, self.seed, self.shuffle_labels)
            groups, self.label_size_, interp, stats, grid = None, None, None, None, None
            max_label = int(yp.max()) if len(yp) else -1
        if not len(yp):
            raise ConfigError("training labels must hold non-ignored pixels; got none (all "
                              f"{IGNORE_INDEX}). Fix: check the labels of the training data.")
        k = self.num_classes if self.num_classes is not None else max_label + 1
        if max_label >= k:
            raise ConfigError(f"labels must lie in [0, {k}) or equal {IGNORE_INDEX}; got "
                              f"{max_label}. Fix: pass num_classes={max_label + 1} or check "
                              "the labels.")
        self.classes_ = np.arange(k)
        self.n_features_in_ = int(Xp.shape[1])
        self.n_pixels_ = len(yp)
        self._fit_pixels(Xp, yp, groups, k, interp, stats, grid)
        self.fit_seconds_ = time.perf_counter() - started
        log.debug("probe: %d pixels x %d features, %d classes, alpha %.3g, %d iterations, "
                  "%.2f s", len(yp), Xp.shape[1], k, self.alpha_, self.n_iter_,
                  self.fit_seconds_)
        return self

    def _fit_pixels(self, Xp: np.ndarray, yp: np.ndarray, groups: np.ndarray | None,
                    k: int, interp: tuple[np.ndarray, np.ndarray] | None,
                    stats: tuple[np.ndarray, np.ndarray] | None,
                    grid: tuple[tuple[int, int, int], np.ndarray] | None) -> None:
        """Fit on pixel rows ``Xp``, or on cells ``Xp`` with ``interp`` (see ``fit_logreg``);
        ``stats``: the exact pixel-feature mean and variance when ``Xp`` holds cells; ``grid``:
        ``(shape, label map)`` of a dense sample (the final fit upsamples whole logit maps)."""
        dev = resolve_device(self.device)
        dt = _DTYPES[self.dtype]
        X = torch.from_numpy(Xp).to(dev, dt)
        if interp is not None:
            interp = (torch.from_numpy(interp[0]).to(dev), torch.from_numpy(interp[1]).to(dev, dt))
        if self.standardize:
            if stats is None:
                mean, scale = X.mean(0), X.std(0, unbiased=False)
            else:  # affine maps commute with interpolation: standardise the cells
                mean = torch.from_numpy(stats[0]).to(dev, dt)
                scale = torch.from_numpy(np.sqrt(stats[1])).to(dev, dt)
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            X = (X - mean) / scale
        else:
            mean, scale = torch.zeros(X.shape[1], device=dev, dtype=dt), None
        present = np.unique(yp)  # only classes seen in training enter the softmax
        y = torch.from_numpy(np.searchsorted(present, yp)).to(dev)
        cw = None
        if self.class_weight == "balanced":
            counts = torch.bincount(y, minlength=len(present)).to(dt)
            cw = len(y) / (len(present) * counts)
        final = dict(interp=interp)
        if grid is not None:
            label_map = grid[1]
            mapped = np.full(label_map.shape, IGNORE, np.int64)
            valid = label_map != IGNORE_INDEX
            mapped[valid] = np.searchsorted(present, label_map[valid])
            final = dict(interp=None, grid=grid[0])
        if self.alpha is None:
            self.alpha_, self.alpha_scores_, init = self._choose_alpha(X, y, cw, groups,
                                                                       len(present), interp)
        else:
            self.alpha_, self.alpha_scores_, init = float(self.alpha), {}, None
        target = y if grid is None else torch.from_numpy(mapped).to(dev)
        W, b, self.n_iter_ = fit_logreg(X, target, len(present), self.alpha_, class_weight=cw,
                                        init=init, max_iter=self.max_iter, tol=self.tol,
                                        **final)
        if self.n_iter_ >= self.max_iter:
            log.info("probe: L-BFGS stopped at max_iter=%d before tol=%g", self.max_iter,
                     self.tol)
        if scale is not None:  # fold the standardisation into the weights
            W = W / scale
            b = b - W @ mean
            self.mean_, self.scale_ = mean.cpu().numpy(), scale.cpu().numpy()
        else:
            self.mean_, self.scale_ = np.zeros(X.shape[1]), np.ones(X.shape[1])
        coef = torch.zeros(k, X.shape[1], dtype=dt)
        intercept = torch.full((k,), _NEG, dtype=dt)
        idx = torch.from_numpy(present)
        coef[idx], intercept[idx] = W.cpu(), b.cpu()
        self.coef_, self.intercept_ = coef.numpy(), intercept.numpy()

    def _choose_alpha(self, X: torch.Tensor, y: torch.Tensor, cw: torch.Tensor | None,
                      groups: np.ndarray | None, k: int,
                      interp: tuple[torch.Tensor, torch.Tensor] | None
                      ) -> tuple[float, dict, tuple]:
        from featlab.segment.metrics import ConfusionMatrix

        rng = np.random.default_rng([self.seed, 2])
        if groups is not None and len(np.unique(groups)) >= 2:
            images = np.unique(groups)
            held_images = rng.permutation(images)[:max(1, round(self.holdout * len(images)))]
            held = np.isin(groups, held_images)
        else:
            held = np.zeros(len(y), bool)
            held[rng.permutation(len(y))[:max(1, round(self.holdout * len(y)))]] = True
        # the path runs on at most _PATH_PIXELS pixels each side (the choice needs a ranking,
        # not the final fit); the chosen alpha is refitted on every sampled pixel
        tr = np.flatnonzero(~held)
        te = np.flatnonzero(held)
        tr = torch.from_numpy(np.sort(rng.permutation(tr)[:_PATH_PIXELS])).to(X.device)
        te = torch.from_numpy(np.sort(rng.permutation(te)[:_PATH_PIXELS])).to(X.device)
        init, scores, best, best_init = None, {}, None, None
        for alpha in sorted(self.alphas, reverse=True):  # strongest first: warm starts
            rows, sub = (X[tr], None) if interp is None else (X, (interp[0][tr], interp[1][tr]))
            W, b, _ = fit_logreg(rows, y[tr], k, alpha, interp=sub, class_weight=cw, init=init,
                                 max_iter=self.max_iter, tol=self.tol)
            init = (W, b)
            if interp is None:
                pred = linear_logits(X[te], W, b).argmax(1)
            else:
                pred = linear_logits(X, W, b, (interp[0][te], interp[1][te])).argmax(1)
            cm = ConfusionMatrix(k, ignore_index=None).update(pred.cpu(), y[te].cpu())
            scores[float(alpha)] = cm.miou()
            if best is None or scores[float(alpha)] > scores[best] + 1e-12:
                best, best_init = float(alpha), init
        log.debug("probe: held-out mIoU per alpha %s -> %g", scores, best)
        return best, scores, best_init

    def _check_params(self) -> None:
        if self.alpha is not None and not (isinstance(self.alpha, (int, float))
                                           and self.alpha >= 0):
            raise ConfigError(f"`alpha` of PixelProbe must be None or a number >= 0; got "
                              f"{self.alpha!r}. Fix: e.g. alpha=1e-4.")
        if self.alpha is None and (not self.alphas or min(self.alphas) < 0):
            raise ConfigError(f"`alphas` of PixelProbe must be non-empty and >= 0; got "
                              f"{self.alphas!r}. Fix: e.g. alphas=(1e-5, 1e-4, 1e-3).")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"`holdout` of PixelProbe must lie in (0, 1); got "
                              f"{self.holdout!r}. Fix: e.g. 0.2.")
        if self.class_weight not in (None, "balanced"):
            raise ConfigError(f"`class_weight` of PixelProbe must be None or 'balanced'; got "
                              f"{self.class_weight!r}.")
        if self.max_pixels is not None and (not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 1):
            raise ConfigError(f"`max_pixels` of PixelProbe must be None or an int >= 1; got "
                              f"{self.max_pixels!r}. Fix: e.g. 200000.")
        if self.dtype not in _DTYPES:
            raise ConfigError(f"`dtype` of PixelProbe must be one of {list(_DTYPES)}; got "
                              f"{self.dtype!r}.")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"`batch_size` of PixelProbe must be an int >= 1; got "
                              f"{self.batch_size!r}.")

    # ---- prediction -------------------------------------------------------------------------
    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            from sklearn.exceptions import NotFittedError

            raise NotFittedError("This PixelProbe is not fitted yet; call fit(X, y) first.")

    def _logits(self, X: Any, size: tuple[int, int] | None) -> torch.Tensor:
        """Logits of one in-memory chunk: ``(n, K)`` or ``[B, K, H, W]`` (upsampled to size)."""
        W = torch.from_numpy(self.coef_).float()
        b = torch.from_numpy(self.intercept_).float()
        x = as_tensor(X, torch.float32)
        if x.ndim == 2:
            return torch.addmm(b, x, W.t())
        logits = torch.einsum("nchw,kc->nkhw", x, W) + b[:, None, None]
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(logits, size=tuple(size), mode="bilinear",
                                   align_corners=False)
        return logits

    def _size(self, size: tuple[int, int] | None) -> tuple[int, int] | None:
        return tuple(size) if size is not None else self.label_size_

    def _stream(self, X: Any, size: tuple[int, int] | None, fn) -> np.ndarray:
        self._check_fitted()
        if len(X.shape) == 2:
            return fn(self._logits(X, None)).numpy()
        return np.concatenate([fn(self._logits(X[sl], self._size(size))).numpy()
                               for sl in batches(len(X), self.batch_size)])

    def decision_function(self, X: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        """Logits: ``(n, K)`` for pixel data; ``[N, K, H, W]`` at ``size`` (default: the
        training label size) for image data."""
        return self._stream(X, size, lambda t: t)

    def predict_proba(self, X: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        """Softmax of :meth:`decision_function` (class axis 1)."""
        return self._stream(X, size, lambda t: t.softmax(1))

    def predict(self, X: Any, size: tuple[int, int] | None = None) -> np.ndarray:
        """Class indices: ``(n,)`` or ``[N, H, W]``."""
        return self._stream(X, size, lambda t: t.argmax(1))

    def evaluate(self, X: Any, y: Any):
        """A :class:`~featlab.segment.metrics.ConfusionMatrix` over every non-ignored pixel of
        ``y`` (image data: logits upsampled to the label size, batch by batch)."""
        from featlab.segment.metrics import ConfusionMatrix

        self._check_fitted()
        kind = _kind(X, y)
        cm = ConfusionMatrix(len(self.classes_), ignore_index=IGNORE_INDEX)
        if kind == "pixels":
            labels = np.asarray(y).astype(np.int64)
            self._check_inferred_classes(labels)
            return cm.update(self.predict(X), labels)
        size = tuple(y.shape[1:])
        for sl in batches(len(X), self.batch_size):
            labels = as_tensor(y[sl]).to(torch.int64)
            self._check_inferred_classes(labels)
            cm.update(self._logits(X[sl], size).argmax(1), labels)
        return cm

    def _check_inferred_classes(self, labels) -> None:
        """With ``num_classes=None`` the classes are the training labels'; a higher evaluation
        label is a probe made without the data set's class count, said as such."""
        if self.num_classes is not None:
            return
        labels = torch.as_tensor(labels)
        labels = labels[labels != IGNORE_INDEX]
        if labels.numel() and int(labels.max()) >= len(self.classes_):
            raise ConfigError(
                f"evaluation labels must be among the {len(self.classes_)} classes the probe "
                f"inferred from its training labels (num_classes=None); got class "
                f"{int(labels.max())}. Fix: pass num_classes=len(classes) (the data set's count) "
                "when creating the PixelProbe.")

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Pixel accuracy over the non-ignored pixels (higher is better)."""
        if sample_weight is not None:
            raise ConfigError("`sample_weight` of PixelProbe.score must be None; got an array. "
                              "Fix: use evaluate(X, y) for per-class metrics.")
        value = self.evaluate(X, y).pixel_accuracy()
        return 0.0 if math.isnan(value) else value


# ---- helpers ---------------------------------------------------------------------------------
def _kind(X: Any, y: Any) -> str:
    xs, ys = tuple(getattr(X, "shape", ())), tuple(getattr(y, "shape", ()))
    if len(xs) == 4 and len(ys) == 3 and xs[0] == ys[0]:
        return "image"
    if len(xs) == 2 and len(ys) == 1 and xs[0] == ys[0]:
        return "pixels"
    raise ConfigError(f"X and y must be [N, C, h, w] features with [N, H, W] labels, or (n, C) "
                      f"pixels with (n,) labels; got X {list(xs)} and y {list(ys)}. Fix: pass "
                      "arrays with shape (e.g. cache[point] and cache.labels).")


def _pixels(X: Any, y: Any, max_pixels: int | None, seed: int, shuffle: bool
            ) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y)
    if y.dtype.kind not in "iu":
        raise ConfigError(f"y must hold integer class indices; got dtype {y.dtype}. Fix: "
                          "cast the labels to int.")
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(y != IGNORE_INDEX)
    if max_pixels is not None and len(keep) > max_pixels:
        keep = np.sort(rng.choice(keep, size=max_pixels, replace=False))
    Xp = np.asarray(X)[keep].astype(np.float32)
    yp = y[keep]
    if shuffle:
        yp = yp[np.random.default_rng([seed, 1]).permutation(len(yp))]
    return Xp, yp
