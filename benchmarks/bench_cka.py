"""CKA benchmark: the full L x L linear CKA matrix of resnet18's 12 skip points, N samples.

featlab (``featlab.analysis.similarity``) against the public packages ``torch-cka`` (import
``torch_cka``, AntixK/PyTorch-Model-Compare) and ``ckatorch``, on the same float32 features, in
the same run, one thread by default. featlab and ckatorch compute in float64; torch-cka only
runs in float32 (its estimator multiplies by float32 ``ones`` vectors and fails on float64):

    python benchmarks/bench_cka.py [--quick] [--samples 5000] [--features synthetic|shapes]
                                   [--pairs 6] [--batch-size 500] [--threads 1]

Features (per-image, spatially pooled, the real channel widths of resnet18's 12 skip points:
64 x 6, 128 x 2, 256 x 2, 512 x 2): ``synthetic`` (default) builds them seeded as a chain
``h_i = relu(h_{i-1} A_i) + noise``, so neighbouring points are similar as in a real network;
extracting 5000 images on a shared 2-core CPU takes minutes, so ``shapes`` (global-average-pooled
resnet18 activations of shapes images at 64 px, random weights) is optional.

What is compared (each against a plain float64 numpy reference written here, pair by pair):

1. *full-data linear CKA, biased* (Kornblith et al. 2019): featlab ``cka_arrays`` vs
   ``ckatorch.core.cka_base(x, y, "linear")`` called for every pair, as ckatorch's own loop
   does (it builds two N x N Gram matrices per pair; ``--pairs`` x 4 pairs spread over the
   matrix are run and the time is extrapolated to all pairs).
2. *full-data linear CKA, debiased* (unbiased HSIC): featlab vs ``cka_base(...,
   unbiased=True)`` (same pairs) and ``torch_cka.CKA.compare`` given
   the whole data set as one batch. torch-cka only takes models and data loaders: the features
   are served by a tiny "replay" model whose ``nn.Identity`` submodules (one per point) return
   the stored features of the batch's indices, so its hooks, loops and estimator run unchanged.
   It costs O(N^3) per pair (three N x N products), so with N = 5000 only ``--pairs`` pairs are
   run and the time is extrapolated to all L x L pairs (its cost per pair does not depend on
   the widths); the error is measured on the pairs run.
3. *minibatch CKA* (Nguyen et al. 2021, the packages' native mode): the same fixed batches of
   ``--batch-size`` for all three: featlab ``MinibatchAccumulator``, torch-cka with a data loader
   over those batches, and ``ckatorch.core.cka_batch`` on the stacked batches (ckatorch's
   ``CKA.__call__`` cannot be used: it needs 3-D layer outputs and keeps only the last batch's
   value).

"products" is the time of the matrix products no method can avoid, the cheaper of two ways on
centred float64 features: the feature form ``X_i^T X_j`` for every pair i <= j (one product per
point against the concatenation of the later points), or the Gram form (``K_i = X_i X_i^T``
per point and ``<K_i, K_j>`` for all pairs). The goals: featlab >= 30x faster than the fastest
package that is correct to 1e-6, and within 2x of "products".
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch
from torch import nn

WIDTHS = {"conv1": 64, "bn1": 64, "relu": 64, "maxpool": 64, "layer1.0": 64, "layer1.1": 64,
          "layer2.0": 128, "layer2.1": 128, "layer3.0": 256, "layer3.1": 256, "layer4.0": 512,
          "layer4.1": 512}


# ---- features ------------------------------------------------------------------------------
def synthetic(n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h = rng.normal(size=(n, 64))
    out = {}
    for name, d in WIDTHS.items():
        a = rng.normal(size=(h.shape[1], d)) / np.sqrt(h.shape[1])
        h = np.maximum(h @ a, 0) + 0.3 * rng.normal(size=(n, d)) + rng.normal(size=d)
        out[name] = h.astype(np.float32)
    return out


def shapes_features(n: int, seed: int) -> dict[str, np.ndarray]:
    import featlab

    model, spec = featlab.get_backbone("resnet18", weights="none", seed=seed)
    ds = featlab.load_dataset("shapes", split="train", size=64, length=n)
    feats: dict[str, list] = {k: [] for k in WIDTHS}
    with torch.inference_mode(), featlab.capture(model, list(WIDTHS)) as acts:
        for start in range(0, n, 64):
            x = torch.stack([ds[i]["image"] for i in range(start, min(n, start + 64))])
            model(spec.normalize(x))
            for k in WIDTHS:
                feats[k].append(acts[k].mean((2, 3)).numpy())
    return {k: np.concatenate(v).astype(np.float32) for k, v in feats.items()}


# ---- the float64 numpy reference (pair by pair, Kornblith et al.'s feature-space formulas) -
def ref_matrix(xs: list[np.ndarray], debiased: bool) -> np.ndarray:
    cs = [x.astype(np.float64) - x.astype(np.float64).mean(0) for x in xs]
    n = len(cs[0])

    def hsic(a, b):
        dot = np.linalg.norm(a.T @ b) ** 2
        if not debiased:
            return dot
        ra, rb = (a * a).sum(1), (b * b).sum(1)
        return dot - n / (n - 2) * ra @ rb + ra.sum() * rb.sum() / ((n - 1) * (n - 2))

    self_ = [hsic(c, c) for c in cs]
    return np.array([[hsic(a, b) / np.sqrt(sa * sb) for b, sb in zip(cs, self_)]
                     for a, sa in zip(cs, self_)])


def ref_minibatch(xs: list[np.ndarray], plan: list[np.ndarray]) -> np.ndarray:
    total = 0
    for rows in plan:
        ks = [x[rows].astype(np.float64) @ x[rows].astype(np.float64).T for x in xs]
        b = len(rows)
        for k in ks:
            np.fill_diagonal(k, 0)
        one = np.ones(b)
        s = [k.sum() for k in ks]
        u = np.stack([k @ one for k in ks])
        t = np.array([[(ki * kj).sum() for kj in ks] for ki in ks])
        h = (t + np.outer(s, s) / ((b - 1) * (b - 2)) - 2 / (b - 2) * u @ u.T) / (b * (b - 3))
        total = total + h
    d = np.sqrt(np.diag(total))
    return total / np.outer(d, d)


# ---- timing helpers -------------------------------------------------------------------------
def best_time(fn, repeats: int):
    best, value = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def products(xs: list[np.ndarray], form: str) -> None:
    """The products on centred float64 features: feature form X_i^T X_j (i <= j), or Gram form
    K_i = X_i X_i^T and <K_i, K_j> for all pairs (one product of the flattened Grams)."""
    cs = [torch.from_numpy(x).double() for x in xs]
    cs = [c - c.mean(0) for c in cs]
    if form == "gram":
        v = torch.stack([(c @ c.T).reshape(-1) for c in cs])
        v @ v.T
        return
    cat = torch.cat(cs, 1)
    offset = 0
    for c in cs:
        c.T @ cat[:, offset:]
        offset += c.shape[1]


def pair_subset(L: int, k: int) -> list[tuple[int, int]]:
    pairs = [(i, j) for i in range(L) for j in range(L)]
    if k >= len(pairs):
        return pairs
    return [pairs[int(round(q))] for q in np.linspace(0, len(pairs) - 1, k)]


class Replay(nn.Module):
    """A 'model' for torch-cka: its forward(indices) passes each point's stored features through
    an nn.Identity submodule named after the point, so forward hooks see real tensors."""

    def __init__(self, feats: dict[str, torch.Tensor]):
        super().__init__()
        self.feats = feats
        self.points = nn.ModuleDict({k.replace(".", "_"): nn.Identity() for k in feats})

    def forward(self, idx: torch.Tensor) -> None:
        for key, value in self.feats.items():
            self.points[key.replace(".", "_")](value[idx])


def torch_cka_matrix(feats: dict[str, torch.Tensor], rows_pairs, batches) -> tuple[dict, float]:
    from torch_cka import CKA

    loader = [[torch.as_tensor(rows)] for rows in batches]
    out, elapsed = {}, 0.0
    for i, j in rows_pairs:
        a, b = list(feats)[i], list(feats)[j]
        m1, m2 = Replay({a: feats[a]}), Replay({b: feats[b]})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cka = CKA(m1, m2, "first", "second", [f"points.{a.replace('.', '_')}"],
                      [f"points.{b.replace('.', '_')}"], device="cpu")
            t0 = time.perf_counter()
            cka.compare(_Loader(loader), _Loader(loader))
            elapsed += time.perf_counter() - t0
        out[(i, j)] = float(cka.hsic_matrix[0, 0])
    return out, elapsed


class _Loader(list):
    """A list of batches that torch-cka accepts as a DataLoader (it reads .dataset)."""

    dataset = "replayed features"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N=600, all pairs, batch 100")
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--features", choices=["synthetic", "shapes"], default="synthetic")
    parser.add_argument("--pairs", type=int, default=6,
                        help="pairs run by the slow baselines (torch-cka full data: this many; "
                             "ckatorch cka_base and torch-cka minibatch: 4x); the time is "
                             "extrapolated to all L x L pairs")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.quick:
        args.samples, args.batch_size, args.pairs, args.repeats = 600, 100, 144, 2
    torch.set_num_threads(args.threads)
    try:
        import ckatorch.core  # noqa: F401
        import torch_cka  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"bench_cka needs the baselines: pip install -e '.[bench]' "
                         f"(torch-cka, ckatorch); {err}") from None
    from ckatorch.core import cka_base, cka_batch

    from featlab.analysis._representations import batch_plan
    from featlab.analysis.similarity import MinibatchAccumulator, cka_arrays

    n = args.samples
    t0 = time.perf_counter()
    feats = (synthetic if args.features == "synthetic" else shapes_features)(n, args.seed)
    names = list(feats)
    xs = [feats[k] for k in names]
    L = len(xs)
    print(f"{args.features} features of resnet18's {L} skip points, N={n}, widths "
          f"{[x.shape[1] for x in xs]} ({time.perf_counter() - t0:.1f} s); torch "
          f"{torch.__version__}, {torch.get_num_threads()} thread(s); load "
          f"{os.getloadavg()[0]:.2f}")
    rows = []

    def row(label, seconds, err, note=""):
        rows.append((label, seconds, err, note))
        print(f"  {label:<44} {seconds:9.3f} s   max|err| {err:.1e}  {note}")

    t_feat, _ = best_time(lambda: products(xs, "feature"), args.repeats)
    row("products, feature form: X_i^T X_j, i<=j", t_feat, 0.0)
    t_prod = t_feat
    width = sum(x.shape[1] for x in xs)
    if n <= 2 * width:   # else the Gram form is plainly dearer (N / total width times the flops)
        t_gram, _ = best_time(lambda: products(xs, "gram"), args.repeats)
        row("products, Gram form: X_i X_i^T, <K_i, K_j>", t_gram, 0.0)
        t_prod = min(t_feat, t_gram)

    # 1. biased, full data
    ref_b = ref_matrix(xs, debiased=False)
    t_fb, (m, _, form) = best_time(lambda: cka_arrays(xs, estimator="biased"), args.repeats)
    row(f"featlab linear biased ({form} form)", t_fb, np.abs(m - ref_b).max())
    tx = [torch.from_numpy(x) for x in xs]
    pairs = [(i, j) for i in range(L) for j in range(L)]
    subset = pair_subset(L, args.pairs * 4)   # pairs spread over the matrix (all widths)
    t0 = time.perf_counter()
    vals = {(i, j): float(cka_base(tx[i], tx[j], kernel="linear")) for i, j in subset}
    t_ckb = (time.perf_counter() - t0) * L * L / len(subset)
    err = max(abs(v - ref_b[p]) for p, v in vals.items())
    row("ckatorch cka_base per pair (biased)", t_ckb, err, extrapolated(subset, L))

    # 2. debiased, full data
    ref_d = ref_matrix(xs, debiased=True)
    t_fd, (m, _, _) = best_time(lambda: cka_arrays(xs, estimator="debiased"), args.repeats)
    row("featlab linear debiased", t_fd, np.abs(m - ref_d).max())
    # torch-cka's estimator multiplies by float32 ones vectors: it only runs in float32
    t0 = time.perf_counter()
    vals = {(i, j): float(cka_base(tx[i], tx[j], kernel="linear", unbiased=True))
            for i, j in subset}
    t_ckd = (time.perf_counter() - t0) * L * L / len(subset)
    err = max(abs(v - ref_d[p]) for p, v in vals.items())
    row("ckatorch cka_base per pair (unbiased)", t_ckd, err, extrapolated(subset, L))
    feats_t = {k: torch.from_numpy(v) for k, v in feats.items()}
    subset = pair_subset(L, args.pairs)
    vals, t_sub = torch_cka_matrix(feats_t, subset, [np.arange(n)])
    t_tcd = t_sub * L * L / len(subset)
    err = max(abs(v - ref_d[p]) for p, v in vals.items())
    row("torch-cka compare, one batch of N (debiased)", t_tcd, err, extrapolated(subset, L))

    # 3. minibatch, the packages' native mode
    plan = batch_plan(n, args.batch_size, args.seed)
    ref_m = ref_minibatch(xs, plan)

    def featlab_minibatch():
        acc = MinibatchAccumulator()
        for r in plan:
            acc.update([x[r] for x in xs])
        return acc.result(names, names)[0]

    t_fm, m = best_time(featlab_minibatch, args.repeats)
    row(f"featlab minibatch (batches of {args.batch_size})", t_fm, np.abs(m - ref_m).max())
    subset = pair_subset(L, max(args.pairs * 4, 24))
    vals, t_sub = torch_cka_matrix(feats_t, subset, plan)
    err = max(abs(v - ref_m[p]) for p, v in vals.items())
    row("torch-cka compare, same batches", t_sub * L * L / len(subset), err,
        extrapolated(subset, L))
    equal = len({len(r) for r in plan}) == 1
    if equal:
        stacked = [torch.from_numpy(np.stack([x[r] for r in plan])).double() for x in xs]
        t0 = time.perf_counter()
        vals = {(i, j): float(cka_batch(stacked[i], stacked[j])) for i, j in pairs}
        t_ckm = time.perf_counter() - t0
        err = max(abs(v - ref_m[p]) for p, v in vals.items())
        row("ckatorch cka_batch per pair, same batches", t_ckm, err, f"{len(pairs)} pairs")

    print("\nratios: fastest package correct to 1e-6 (max|err| vs the float64 reference) / featlab,"
          " per estimator (goal >= 30x):")
    for est, featlab_time, kinds in (("full data, biased", t_fb, ("cka_base",)),
                                     ("full data, debiased", t_fd, ("one batch of N",
                                                                    "(unbiased)")),
                                     ("minibatch", t_fm, ("same batches",))):
        ok = [(t, label) for label, t, e, _ in rows if not label.startswith("featlab")
              and any(k in label for k in kinds) and e <= 1e-6]
        if ok:
            t, label = min(ok)
            print(f"  {est:<20}: {label.split(' ')[0]:<9} {t / featlab_time:8.1f}x")
        else:
            print(f"  {est:<20}: no package is correct to 1e-6")
    print(f"featlab / products (goal <= 2x): biased {t_fb / t_prod:.2f}x, debiased "
          f"{t_fd / t_prod:.2f}x, minibatch {t_fm / t_prod:.2f}x")


def extrapolated(subset: list, L: int) -> str:
    return f"{len(subset)} pairs run" + ("" if len(subset) == L * L else
                                         f", extrapolated to {L * L}")


if __name__ == "__main__":
    main()
