"""Full-batch multinomial logistic regression with L-BFGS in torch (CPU or GPU).

The objective is scikit-learn's, written per sample::

    sum_i s_i * CE(W x_i + b, y_i) / sum_i s_i  +  alpha / 2 * ||W||_F^2

with sample weights ``s_i`` (1, or the class weight of ``y_i``) and the intercept not
penalised. scikit-learn's ``LogisticRegression(C=...)`` minimises the same function with
``alpha = 1 / (C * sum_i s_i)``, so the two solve the same problem (see :func:`sklearn_C`).
Convergence: L-BFGS stops when the largest absolute gradient entry is below ``tol`` (scipy's
``pgtol``, which scikit-learn's ``lbfgs`` uses with the same scaling) or after ``max_iter``
iterations.

Preconditioning (``precondition=True``, the default): CNN features are strongly correlated, so
the Hessian, roughly ``c * Cov(x) + alpha * I`` per class, is badly conditioned and L-BFGS needs
hundreds of iterations (scikit-learn's too). The solver therefore works in whitened
coordinates: ``z = (x - mean) @ P`` with ``P = (Cov(x) + eps * I)^(-1/2)``, ``eps = alpha / c``,
and weights ``V`` with ``W = V @ P``; the penalty stays ``alpha / 2 * ||V @ P||^2`` (it is the
same problem, only the coordinates change), and the preconditioned Hessian is close to ``c * I``.
This costs two ``n x C x C`` products once and cuts the iterations several-fold; the gradient
tolerance then applies in the whitened coordinates.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["fit_logreg", "sklearn_C", "linear_logits", "IGNORE"]


def sklearn_C(alpha: float, sample_weight_sum: float) -> float:
    """scikit-learn's ``C`` for the same L2 strength: ``1 / (alpha * sum of sample weights)``.

    Examples:
        >>> sklearn_C(1e-3, 2000)
        0.5
    """
    return 1.0 / (alpha * sample_weight_sum)


def fit_logreg(X: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, *,
               interp: tuple[torch.Tensor, torch.Tensor] | None = None,
               grid: tuple[int, int, int] | None = None,
               class_weight: torch.Tensor | None = None,
               init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 200,
               tol: float = 1e-4, history_size: int = 20, precondition: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise the objective above; return ``(W [K, C], b [K], iterations)``.

    ``X`` [n, C] and ``y`` [n] (int64 in ``[0, num_classes)``) live on the device and in the
    dtype the solver should use; ``class_weight`` [K] gives sample ``i`` the weight
    ``class_weight[y_i]``. Two layouts compute each sample from feature *cells* instead:

    * ``interp = (idx [n, 4], w [n, 4])``: ``X`` holds cells [m, C] and sample ``i`` is
      ``sum_j w[i, j] * X[idx[i, j]]`` (rows of ``w`` sum to one): logits are computed per
      cell and interpolated, the same function at ~m/n the cost;
    * ``grid = (N, h, w)``: ``X`` holds every cell of ``N`` feature maps in ``[image, row,
      col]`` order and ``y`` is a label map ``[N, H, W]`` (:data:`IGNORE` outside the
      training pixels): whole logit maps are upsampled bilinearly (as ``F.interpolate``),
      several times faster again when most pixels of the images are samples.
    """
    m, c = X.shape
    dev, dt = X.device, X.dtype
    valid = y != IGNORE
    n = int(valid.sum())
    if init is None:
        W = torch.zeros(num_classes, c, device=dev, dtype=dt)
        b = torch.zeros(num_classes, device=dev, dtype=dt)
    else:
        W, b = (t.detach().to(dev, dt).clone() for t in init)
    weight = None if class_weight is None else class_weight.to(dev, dt)
    total = float(n) if weight is None else float(weight[y[valid]].sum())
    upsample = None if grid is None else _Upsample.build(grid[1:], tuple(y.shape[-2:]), dev, dt)
    data = _DataTerm(X, y, interp, grid, upsample, weight, total)
    if precondition and m > c:
        rw = _cell_weights(X, valid, interp, grid) / max(n, 1)
        mean = rw @ X
        Xc = X - mean
        cov = (Xc.t() @ (Xc * rw[:, None])).double()
        eps = max(alpha / _CURVATURE, 1e-6 * float(cov.diagonal().mean()), 1e-12)
        evals, evecs = torch.linalg.eigh(cov + eps * torch.eye(c, dtype=cov.dtype,
                                                                  device=cov.device))
        P = (evecs * evals.rsqrt()) @ evecs.t()            # (Cov + eps)^(-1/2)
        P_inv = (evecs * evals.sqrt()) @ evecs.t()
        Q = (P @ P).to(dt)                                 # the penalty's metric in V
        V0, b0 = W @ P_inv.to(dt), b + W @ mean            # same function, new coordinates
        V, b1, it = _lbfgs(replace(data, X=Xc @ P.to(dt)), n, alpha, (V0, b0), max_iter, tol,
                           history_size, metric=Q)
        W = V @ P.to(dt)
        return W, b1 - W @ mean, it
    return _lbfgs(data, n, alpha, (W, b), max_iter, tol, history_size, metric=None)


IGNORE = -100  # label of a pixel that is not a training sample (torch's ignore_index)
_CURVATURE = 0.1  # typical p(1 - p) of the softmax: sets the whitening's ridge eps = alpha / c


def _cell_weights(X: torch.Tensor, valid: torch.Tensor,
                  interp: tuple[torch.Tensor, torch.Tensor] | None,
                  grid: tuple[int, int, int] | None) -> torch.Tensor:
    """Each row's total weight in the samples (for the preconditioner's mean and covariance;
    weighting cells by it only approximates the pixels' covariance, which is all it needs)."""
    if grid is not None:  # the adjoint of the upsampling applied to the training pixels
        z = torch.zeros(grid[0], 1, grid[1], grid[2], device=X.device, dtype=X.dtype,
                        requires_grad=True)
        up = F.interpolate(z, size=tuple(valid.shape[-2:]), mode="bilinear",
                           align_corners=False)
        (up * valid[:, None].to(X.dtype)).sum().backward()
        return z.grad.flatten()
    if interp is not None:
        return torch.bincount(interp[0].flatten(), weights=interp[1].flatten().double(),
                              minlength=len(X)).to(X.dtype)
    return torch.ones(len(X), device=X.device, dtype=X.dtype)


@dataclass(frozen=True)
class _DataTerm:
    """The weighted mean cross-entropy of ``(W, b)`` on one layout of the samples."""

    X: torch.Tensor
    y: torch.Tensor
    interp: tuple[torch.Tensor, torch.Tensor] | None
    grid: tuple[int, int, int] | None
    upsample: _Upsample | None
    weight: torch.Tensor | None
    total: float

    def backward(self, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The data term's value; its gradient is accumulated into ``W.grad`` / ``b.grad``.

        The linear step runs once; the cross-entropy (with the interpolation or upsampling)
        runs over chunks of about ``_CHUNK`` logits, each backpropagated into the detached
        logits before the next: memory stays bounded, and the CPU reuses the same buffers
        instead of faulting in fresh pages for every evaluation (which costs more than the
        arithmetic here).
        """
        logits = torch.addmm(b, self.X, W.t())
        leaf = logits.detach().requires_grad_(True)
        value = torch.zeros((), device=leaf.device, dtype=leaf.dtype)
        for part in self._parts(leaf):
            part.backward()
            value += part.detach()
        logits.backward(leaf.grad)
        return value

    def _parts(self, logits: torch.Tensor) -> Iterator[torch.Tensor]:
        k = logits.shape[1]
        chunk = _CHUNK if logits.device.type == "cpu" else 64 * _CHUNK
        if self.grid is not None:
            n, h, w = self.grid
            maps = logits.view(n, h, w, k).permute(0, 3, 1, 2)
            step = max(1, chunk // (k * self.y[0].numel()))
            for lo in range(0, n, step):
                yield self._ce(self.upsample(maps[lo:lo + step]), self.y[lo:lo + step])
            return
        step = max(1, chunk // (4 * k if self.interp is not None else k))
        for lo in range(0, len(self.y), step):
            if self.interp is None:
                yield self._ce(logits[lo:lo + step], self.y[lo:lo + step])
            else:
                idx, w = (t[lo:lo + step] for t in self.interp)
                yield self._ce(_interpolate_cells(logits, idx, w), self.y[lo:lo + step])

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y, weight=self.weight, ignore_index=IGNORE,
                               reduction="sum") / max(self.total, 1e-300)


_CHUNK = 1 << 20  # logits per chunk of the data term on the CPU (64x that on GPUs)


@dataclass(frozen=True)
class _Upsample:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` for ``[N, K, h, w]``.

    Small grids use the separable form ``A_h @ x @ A_w.T`` (two batched matrix products whose
    matrices are ``F.interpolate`` of the identity, so the values agree to rounding): on the
    CPU its forward and backward take ~half the time of ``upsample_bilinear2d``'s. Its cost
    grows with ``h``, so grids larger than ``_MATMUL_CELLS`` cells use ``F.interpolate``.
    """

    size: tuple[int, int]
    rows: torch.Tensor | None     # A_h [H, h]
    cols: torch.Tensor | None     # A_w.T [w, W]

    @classmethod
    def build(cls, hw: tuple[int, int], size: tuple[int, int], device, dtype) -> _Upsample:
        if hw[0] * hw[1] > _MATMUL_CELLS:
            return cls(size, None, None)
        rows, cols = (_bilinear_matrix(i, o, device, dtype) for i, o in zip(hw, size))
        return cls(size, rows, cols.t().contiguous())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        return self.rows @ x @ self.cols


_MATMUL_CELLS = 256


def _bilinear_matrix(n_in: int, n_out: int, device, dtype) -> torch.Tensor:
    """``[n_out, n_in]``: 1-D bilinear resampling (``align_corners=False``) as a matrix."""
    eye = torch.eye(n_in, device=device, dtype=dtype)[:, None, :, None]   # n_in 1-D signals
    return F.interpolate(eye, size=(n_out, 1), mode="bilinear",
                         align_corners=False)[:, 0, :, 0].t()


def _lbfgs(data: _DataTerm, n: int, alpha: float, init: tuple[torch.Tensor, torch.Tensor],
           max_iter: int, tol: float, history_size: int, metric: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    W, b = (t.detach().clone() for t in init)
    W.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 20,
                            tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=history_size, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        penalty = 0.5 * alpha * ((W * W).sum() if metric is None else ((W @ metric) * W).sum())
        penalty.backward()
        return data.backward(W, b) + penalty.detach()

    if n:
        opt.step(closure)
    iterations = int(opt.state[opt._params[0]].get("n_iter", 0)) if n else 0
    return W.detach(), b.detach(), iterations

def linear_logits(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor,
                  interp: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``X @ W.T + b`` per row, or interpolated from cell logits (see :func:`fit_logreg`)."""
    logits = torch.addmm(b, X, W.t())
    if interp is None:
        return logits
    return _interpolate_cells(logits, *interp)


def _interpolate_cells(logits: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_j w[:, j] * logits[idx[:, j]]``: each pixel's logits from its cells'.

    Gathered by ``index_select``, whose gradient (``index_add_``) is deterministic on the CPU;
    ``logits[idx]``'s (an accumulating ``index_put_``) is not with several threads, which made
    the same fit differ between runs by ~1e-3 in its coefficients.
    """
    picked = torch.index_select(logits, 0, idx.reshape(-1)).view(*idx.shape, logits.shape[1])
    return (picked * w[:, :, None]).sum(1)
