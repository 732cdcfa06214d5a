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

import torch
import torch.nn.functional as F

__all__ = ["fit_logreg", "sklearn_C", "linear_logits"]


def sklearn_C(alpha: float, sample_weight_sum: float) -> float:
    """scikit-learn's ``C`` for the same L2 strength: ``1 / (alpha * sum of sample weights)``.

    Examples:
        >>> sklearn_C(1e-3, 2000)
        0.5
    """
    return 1.0 / (alpha * sample_weight_sum)


def fit_logreg(X: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float, *,
               interp: tuple[torch.Tensor, torch.Tensor] | None = None,
               sample_weight: torch.Tensor | None = None,
               init: tuple[torch.Tensor, torch.Tensor] | None = None, max_iter: int = 200,
               tol: float = 1e-4, history_size: int = 20, precondition: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Minimise the objective above; return ``(W [K, C], b [K], iterations)``.

    ``X`` [n, C] and ``y`` [n] (int64 in ``[0, num_classes)``) live on the device and in the
    dtype the solver should use. With ``interp = (idx [n, 4], w [n, 4])``, ``X`` holds feature
    *cells* [m, C] and sample ``i`` is ``sum_j w[i, j] * X[idx[i, j]]`` (rows of ``w`` sum to
    one): logits are computed per cell and interpolated, the same function at ~m/n the cost.
    """
    m, c = X.shape
    n = len(y)
    dev, dt = X.device, X.dtype
    if init is None:
        W = torch.zeros(num_classes, c, device=dev, dtype=dt)
        b = torch.zeros(num_classes, device=dev, dtype=dt)
    else:
        W, b = (t.detach().to(dev, dt).clone() for t in init)
    if precondition and m > c:
        if interp is None:
            rw = torch.full((m,), 1.0 / max(n, 1), device=dev, dtype=dt)
        else:  # each cell weighted by its share in the samples (a preconditioner: approximate)
            rw = torch.bincount(interp[0].flatten(), weights=interp[1].flatten().double(),
                                minlength=m).to(dt) / max(n, 1)
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
        V, b1, it = _lbfgs(Xc @ P.to(dt), y, num_classes, alpha, sample_weight, (V0, b0),
                           max_iter, tol, history_size, metric=Q, interp=interp)
        W = V @ P.to(dt)
        return W, b1 - W @ mean, it
    return _lbfgs(X, y, num_classes, alpha, sample_weight, (W, b), max_iter, tol,
                  history_size, metric=None, interp=interp)


_CURVATURE = 0.1  # typical p(1 - p) of the softmax: sets the whitening's ridge eps = alpha / c


def _lbfgs(X: torch.Tensor, y: torch.Tensor, num_classes: int, alpha: float,
           sample_weight: torch.Tensor | None, init: tuple[torch.Tensor, torch.Tensor],
           max_iter: int, tol: float, history_size: int, metric: torch.Tensor | None,
           interp: tuple[torch.Tensor, torch.Tensor] | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    n = len(y)
    dev, dt = X.device, X.dtype
    W, b = (t.detach().clone() for t in init)
    W.requires_grad_(True)
    b.requires_grad_(True)
    if sample_weight is not None:
        sw = sample_weight.to(dev, dt)
        total = sw.sum()
    else:
        sw, total = None, torch.tensor(float(n), device=dev, dtype=dt)
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=max_iter * 5 // 4 + 20,
                            tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=history_size, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=False)
        logits = linear_logits(X, W, b, interp)
        ce = F.cross_entropy(logits, y, reduction="none")
        data = (ce.sum() if sw is None else (ce * sw).sum()) / total
        penalty = (W * W).sum() if metric is None else ((W @ metric) * W).sum()
        loss = data + 0.5 * alpha * penalty
        loss.backward()
        return loss

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
    idx, w = interp
    return (logits[idx] * w[:, :, None]).sum(1)
