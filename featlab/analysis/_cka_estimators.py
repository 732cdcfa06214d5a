"""HSIC statistics of many representations at once, in float64 (field notes R-3.1 to R-3.3).

Everything here works on float64 torch tensors ``[n, d]`` (n samples, d features) and computes
the statistics of *all* requested pairs of representations in one pass: each representation
is centred (and, in the Gram form, turned into its ``n x n`` Gram matrix) exactly once, and the
pair terms come from one matrix product per representation.

Notation, for one representation X (centred columns) and its linear Gram matrix K = X X^T:

* ``dot[i, j]``  = <K_i, K_j> = ||X_i^T X_j||_F^2 (feature form) — the biased HSIC numerator
  (Kornblith et al. 2019; the 1 / (n-1)^2 factor cancels in CKA);
* ``rows[i, j]`` = r_i . r_j with r = diag(K) (squared row norms), and ``sums[i]`` = tr K_i;
  with them the unbiased HSIC estimator of Song et al. (2012), used by debiased CKA and by
  minibatch CKA (Nguyen, Raghu & Kornblith 2021), is
  ``HSIC_1 = (dot - n/(n-2) rows + s_i s_j / ((n-1)(n-2))) / (n (n-3))``.

For a general kernel (RBF) the same three quantities are taken on K~ = K - diag(K):
``dot = <K~_i, K~_j>``, ``rows = (K~_i 1) . (K~_j 1)``, ``sums = -1^T K~ 1`` (minus, so that
one formula serves both; for centred linear features K~ 1 = -r and 1^T K~ 1 = -tr K).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featlab.errors import ConfigError

__all__ = ["PairStats", "pair_stats", "hsic_from_stats", "choose_form", "rbf_gram"]

FORMS = ("auto", "feature", "gram")
_ZERO_VARIANCE = 1e-20   # centred / raw sum of squares below this: a constant representation


@dataclass
class PairStats:
    """HSIC statistics of the pairs (row set a, column set b); see the module docstring.

    ``dot``, ``rows`` are ``[La, Lb]``; ``dot_a``, ``rows_a``, ``sums_a`` (and ``_b``) are the
    self terms of each representation, needed to normalise. ``biased`` holds the biased HSIC
    numerators (centred Gram matrices) when the kernel is not linear.
    """

    n: int
    dot: torch.Tensor
    rows: torch.Tensor
    dot_a: torch.Tensor
    rows_a: torch.Tensor
    sums_a: torch.Tensor
    dot_b: torch.Tensor
    rows_b: torch.Tensor
    sums_b: torch.Tensor
    constant_a: list[bool]
    constant_b: list[bool]
    form: str
    unbiased: tuple | None = None   # general kernels: the K~ terms of the unbiased estimator


def choose_form(n: int, widths_a: list[int], widths_b: list[int] | None) -> str:
    """``"feature"`` when its flops (n * sum of d_i d_j over pairs) beat the Gram form's
    (n^2 * sum d_i to build each Gram matrix once + n^2 per pair), else ``"gram"``."""
    b = widths_a if widths_b is None else widths_b
    pairs = len(widths_a) * len(b)
    feature = n * sum(widths_a) * sum(b) / (2 if widths_b is None else 1)
    gram = n * n * (sum(widths_a) + (sum(widths_b) if widths_b else 0)) + n * n * pairs
    return "feature" if feature <= gram else "gram"


def _centre(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    raw = _squares(x)
    xc = x - x.mean(0, keepdim=True)
    centred = _squares(xc)
    return xc, centred <= _ZERO_VARIANCE * raw or centred == 0.0


def _row_squares(x: torch.Tensor) -> torch.Tensor:
    """``(x * x).sum(1)`` as ``n`` dot products: no temporary as large as ``x``."""
    return torch.bmm(x[:, None, :], x[:, :, None]).reshape(-1)


def _squares(x: torch.Tensor) -> float:
    """Sum of squares without an ``x * x`` temporary as large as ``x``."""
    flat = x.reshape(-1)
    return float(torch.dot(flat, flat))


def _segment_sums(m: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """Sum of each column block of ``m`` (``[..., sum(widths)]`` -> ``[..., len(widths)]``)."""
    index = torch.repeat_interleave(torch.arange(len(widths), device=m.device),
                                    torch.tensor(widths, device=m.device))
    out = torch.zeros(*m.shape[:-1], len(widths), dtype=m.dtype, device=m.device)
    return out.index_add_(-1, index, m)


def _feature_dots(xs: list[torch.Tensor], ys: list[torch.Tensor] | None) -> tuple:
    """||X_i^T Y_j||_F^2 for all pairs from one product per representation (upper triangle
    only when ys is None), plus the self terms."""
    widths = [x.shape[1] for x in xs]
    cat_x = torch.cat(xs, 1)
    if ys is None:
        la = len(xs)
        dot = torch.zeros(la, la, dtype=torch.float64, device=cat_x.device)
        offsets = [0]
        for w in widths:
            offsets.append(offsets[-1] + w)
        for i, x in enumerate(xs):
            g = x.T @ cat_x[:, offsets[i]:]                      # [d_i, sum_{j>=i} d_j]
            dot[i, i:] = _segment_sums((g * g).sum(0), widths[i:])
        dot = torch.triu(dot) + torch.triu(dot, 1).T
        return dot, torch.diagonal(dot).clone(), torch.diagonal(dot).clone()
    cat_y = torch.cat(ys, 1)
    dot = torch.stack([_segment_sums(((x.T @ cat_y) ** 2).sum(0), [y.shape[1] for y in ys])
                       for x in xs])
    dot_a = torch.stack([((x.T @ x) ** 2).sum() for x in xs])
    dot_b = torch.stack([((y.T @ y) ** 2).sum() for y in ys])
    return dot, dot_a, dot_b


def _gram_dots(ks: list[torch.Tensor], ls: list[torch.Tensor] | None) -> tuple:
    """<K_i, L_j> for all pairs as one product of the stacked, flattened Gram matrices."""
    va = torch.stack([k.reshape(-1) for k in ks])
    if ls is None:
        dot = va @ va.T
        return dot, torch.diagonal(dot).clone(), torch.diagonal(dot).clone()
    vb = torch.stack([k.reshape(-1) for k in ls])
    return va @ vb.T, (va * va).sum(1), (vb * vb).sum(1)


def rbf_gram(x: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """RBF Gram matrix exp(-d^2 / (2 sigma^2)), sigma = ``bandwidth`` x the median distance
    between distinct samples (Kornblith et al. 2019 take the median over all entries)."""
    sq = (x * x).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * (x @ x.T)).clamp_min_(0)
    n = x.shape[0]
    iu = torch.triu_indices(n, n, 1, device=x.device)
    dist = d2[iu[0], iu[1]].sqrt().sort().values
    k = dist.numel()   # the median of an even count is the mean of the two middle values
    median = float(dist[(k - 1) // 2] + dist[k // 2]) / 2 if k else 0.0
    if median == 0.0:
        return torch.ones_like(d2)   # all samples equal: a constant kernel (zero variance)
    sigma = bandwidth * median
    return torch.exp(-d2 / (2 * sigma * sigma))


def pair_stats(xs: list[torch.Tensor], ys: list[torch.Tensor] | None = None, *,
               kernel: str = "linear", form: str = "auto", bandwidth: float = 1.0
               ) -> PairStats:
    """HSIC statistics of every pair (``xs`` x ``xs`` upper triangle, or ``xs`` x ``ys``).

    Args:
        xs: float64 tensors ``[n, d_i]`` (one per representation), same n.
        ys: a second list (cross-model), or None for all pairs within ``xs``.
        kernel: ``"linear"`` or ``"rbf"`` (always the Gram form).
        form: ``"feature"``, ``"gram"`` or ``"auto"`` (:func:`choose_form`); linear only.
        bandwidth: RBF sigma as a fraction of the median distance.
    """
    if form not in FORMS:
        raise ConfigError(f"form must be one of {FORMS}; got {form!r}.")
    n = xs[0].shape[0]
    centred_x = [_centre(x) for x in xs]
    centred_y = None if ys is None else [_centre(y) for y in ys]
    const_a = [c for _, c in centred_x]
    const_b = const_a if ys is None else [c for _, c in centred_y]
    if kernel == "linear":
        xs_c = [x for x, _ in centred_x]
        ys_c = None if ys is None else [y for y, _ in centred_y]
        if form == "auto":
            form = choose_form(n, [x.shape[1] for x in xs_c],
                               None if ys_c is None else [y.shape[1] for y in ys_c])
        r_a = torch.stack([_row_squares(x) for x in xs_c])         # [La, n] diag(K)
        r_b = r_a if ys_c is None else torch.stack([_row_squares(y) for y in ys_c])
        if form == "feature":
            dot, dot_a, dot_b = _feature_dots(xs_c, ys_c)
        else:
            ks = [x @ x.T for x in xs_c]
            dot, dot_a, dot_b = _gram_dots(ks, None if ys_c is None else [y @ y.T for y in ys_c])
        return PairStats(n, dot, r_a @ r_b.T, dot_a, (r_a * r_a).sum(1), r_a.sum(1), dot_b,
                         (r_b * r_b).sum(1), r_b.sum(1), const_a, const_b, form)
    if kernel != "rbf":
        raise ConfigError(f"kernel must be 'linear' or 'rbf'; got {kernel!r}.")
    ks = [rbf_gram(x, bandwidth) for x, _ in centred_x]
    ls = None if ys is None else [rbf_gram(y, bandwidth) for y, _ in centred_y]
    const_a = [c or bool((k == k[0, 0]).all()) for c, k in zip(const_a, ks)]
    const_b = const_a if ls is None else [c or bool((k == k[0, 0]).all())
                                         for c, k in zip(const_b, ls)]
    return _general_stats(ks, ls, const_a, const_b)


def _general_stats(ks: list[torch.Tensor], ls: list[torch.Tensor] | None, const_a: list[bool],
                   const_b: list[bool]) -> PairStats:
    """Stats of arbitrary Gram matrices: ``dot`` for the biased estimator is taken on the
    centred matrices (stored in ``dot``/``dot_a``/``dot_b``); the unbiased terms on K~."""
    def centred(k: torch.Tensor) -> torch.Tensor:
        return k - k.mean(0, keepdim=True) - k.mean(1, keepdim=True) + k.mean()

    n = ks[0].shape[0]
    dot, dot_a, dot_b = _gram_dots([centred(k) for k in ks],
                                   None if ls is None else [centred(k) for k in ls])
    stats = PairStats(n, dot, torch.zeros_like(dot), dot_a, dot_a * 0, dot_a * 0, dot_b,
                      dot_b * 0, dot_b * 0, const_a, const_b, "gram")
    # unbiased terms for the debiased estimator: on K~ = K - diag(K)
    kt = [k - torch.diag(torch.diagonal(k)) for k in ks]
    lt = None if ls is None else [k - torch.diag(torch.diagonal(k)) for k in ls]
    stats.unbiased = _unbiased_terms(kt, lt)
    return stats


def _unbiased_terms(kt: list[torch.Tensor], lt: list[torch.Tensor] | None) -> tuple:
    dot, dot_a, dot_b = _gram_dots(kt, lt)
    ua = torch.stack([k.sum(1) for k in kt])
    ub = ua if lt is None else torch.stack([k.sum(1) for k in lt])
    return (dot, dot_a, dot_b, ua @ ub.T, (ua * ua).sum(1), (ub * ub).sum(1),
            ua.sum(1), ub.sum(1))


def _hsic1(n: int, dot, rows, sa, sb) -> torch.Tensor:
    return (dot - n / (n - 2) * rows + sa * sb / ((n - 1) * (n - 2))) / (n * (n - 3))


def _hsic1_tilde(n: int, dot_t, uu, ta, tb) -> torch.Tensor:
    """HSIC_1 from K~ terms: (tr(K~L~) + 1'K~1 1'L~1/((n-1)(n-2)) - 2/(n-2) 1'K~L~1) / n(n-3)."""
    return (dot_t + ta * tb / ((n - 1) * (n - 2)) - 2 / (n - 2) * uu) / (n * (n - 3))


def hsic_from_stats(s: PairStats, estimator: str) -> tuple[torch.Tensor, torch.Tensor,
                                                           torch.Tensor]:
    """``(hsic_ab [La, Lb], hsic_aa [La], hsic_bb [Lb])`` for ``"biased"`` or ``"debiased"``.

    Biased values are the numerators <HKH, HLH> (without the 1 / (n-1)^2 factor, which cancels
    in CKA); debiased values are HSIC_1 (needs n >= 4).
    """
    n = s.n
    if estimator == "biased":
        return s.dot, s.dot_a, s.dot_b
    if estimator != "debiased":
        raise ConfigError(f"estimator must be 'biased' or 'debiased'; got {estimator!r}.")
    if n < 4:
        raise ConfigError(f"the unbiased HSIC estimator needs at least 4 samples; got {n}. "
                          "Fix: use more samples (or estimator='biased').")
    if s.unbiased is not None:   # general kernel
        dot, dot_a, dot_b, uu, ua2, ub2, ta, tb = s.unbiased
        return (_hsic1_tilde(n, dot, uu, ta[:, None], tb[None, :]),
                _hsic1_tilde(n, dot_a, ua2, ta, ta), _hsic1_tilde(n, dot_b, ub2, tb, tb))
    return (_hsic1(n, s.dot, s.rows, s.sums_a[:, None], s.sums_b[None, :]),
            _hsic1(n, s.dot_a, s.rows_a, s.sums_a, s.sums_a),
            _hsic1(n, s.dot_b, s.rows_b, s.sums_b, s.sums_b))
