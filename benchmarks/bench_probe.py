"""Probe benchmark: PixelProbe vs scikit-learn LogisticRegression (lbfgs) and SGDClassifier.

Data: real features, not synthetic: resnet18 (``shapes`` weights when trained, else random) on
``shapes`` at 64 px, point ``layer2.1`` (128 channels, stride 8), 9 classes. Training pixels are
every labelled pixel of 50 train images (204,800 pixels) with their bilinearly upsampled
features (the evaluated model: logits upsampled bilinearly to the labels); held-out accuracy is
over every pixel of 16 val images. scikit-learn gets those pixel features materialised as an
``(n, 128)`` array; PixelProbe fits the same problem (same L2 strength: ``alpha`` per pixel on
standardised features, scikit-learn's ``C = 1 / (alpha * n)``), once streamed from the cache
(timing includes reading it) and once on the materialised array, in one run. Every method
runs once untimed (first-call allocations), then ``--repeats`` times (median reported;
SGDClassifier, far slower, once):

    python benchmarks/bench_probe.py [--quick] [--alpha 1e-4] [--device cpu|cuda] [--repeats 3]

Goal: PixelProbe >= 10x faster than LogisticRegression at held-out accuracy within 0.5 points.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch


def features(tmp: Path, n_train: int, n_val: int, size: int, point: str):
    import featlab
    from featlab.analysis._pixels import sample_pixels
    from featlab.errors import WeightsNotFoundError

    try:
        model, spec = featlab.get_backbone("resnet18", weights="shapes")
    except WeightsNotFoundError:
        model, spec = featlab.get_backbone("resnet18", weights="none")
    out = {}
    for split, n in (("train", n_train), ("val", n_val)):
        ds = featlab.load_dataset("shapes", split=split, size=size, length=n)
        featlab.extract(model, ds, [point], tmp / f"{split}.h5", spec=spec, batch_size=16,
                        dtype="float32", num_workers=0, progress=False)
        cache = featlab.open_cache(tmp / f"{split}.h5")
        s = sample_pixels(cache[point], cache.labels, max_pixels=None, seed=0,
                          ignore_index=255, batch_size=16)
        out[split] = (s.X, s.y, cache)
    return out, spec.weights


def timed(fn, repeats: int, warm_up: bool = True):
    """``(fn(), median seconds)`` over ``repeats`` timed calls (after one untimed call)."""
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - t0)
    return value, float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 train images (49k pixels)")
    parser.add_argument("--alpha", type=float, default=1e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--converged", action="store_true",
                        help="also run LogisticRegression to convergence (max_iter=1000)")
    args = parser.parse_args()
    n_train = 12 if args.quick else 50
    with tempfile.TemporaryDirectory() as tmp:
        data, weights = features(Path(tmp), n_train, 16, 64, "layer2.1")
        run(args, data, weights)


def run(args, data, weights) -> None:
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featlab.analysis._logreg import sklearn_C
    from featlab.analysis.pixel_probe import PixelProbe

    (X, y, train), (Xv, yv, val) = data["train"], data["val"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"resnet18 ({weights}) layer2.1 on shapes 64 px: {X.shape[0]} train pixels x "
          f"{X.shape[1]} features, {len(np.unique(y))} classes; {len(yv)} val pixels")
    C = sklearn_C(args.alpha, len(y))
    r = args.repeats
    runs = {}
    streamed = PixelProbe(args.alpha, device=args.device, max_pixels=None)
    runs["featlab PixelProbe, from the cache"] = timed(
        lambda: streamed.fit(train["layer2.1"], train.labels), r)
    probe = PixelProbe(args.alpha, device=args.device, max_pixels=None)
    runs["featlab PixelProbe, pixel array"] = timed(lambda: probe.fit(X, y), r)
    sampled = PixelProbe(args.alpha, device=args.device)  # the default: 100k sampled pixels
    runs["featlab PixelProbe, default sampling"] = timed(lambda: sampled.fit(X, y), r)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning: reported through n_iter_
        runs["sklearn LogisticRegression (lbfgs)"] = timed(lambda: make_pipeline(
            StandardScaler(), LogisticRegression(C=C)).fit(X, y), r)
        if args.converged:
            runs["sklearn LogisticRegression, max_iter=1000"] = timed(lambda: make_pipeline(
                StandardScaler(), LogisticRegression(C=C, max_iter=1000)).fit(X, y), 1, False)
        runs["sklearn SGDClassifier (log_loss), 1 run"] = timed(lambda: make_pipeline(
            StandardScaler(), SGDClassifier(loss="log_loss", alpha=args.alpha,
                                            random_state=0)).fit(X, y), 1, False)
    base_time = runs["featlab PixelProbe, from the cache"][1]
    base_acc = streamed.score(val["layer2.1"], val.labels)
    print(f"{'method':<38} {'fit s':>8} {'iters':>6} {'val acc':>8} {'time / featlab':>15} "
          f"{'acc - featlab':>14}")
    for name, (est, secs) in runs.items():
        acc = base_acc if est is streamed else est.score(Xv, yv)
        it = est.n_iter_ if hasattr(est, "n_iter_") else est[-1].n_iter_
        it = int(np.max(it))
        print(f"{name:<38} {secs:8.2f} {it:6d} {acc:8.4f} {secs / base_time:14.1f}x "
              f"{100 * (acc - base_acc):+13.2f}")


if __name__ == "__main__":
    main()
