"""Foundation benchmark: shapes generation rate, and bare forward vs capture of all skip points.

Runs resnet18 at 128 px on the CPU (or --device cuda) with the same batches for each variant,
in the same process, and prints images/s side by side with their ratios:

    python benchmarks/bench_capture.py [--batch-size 16] [--batches 8] [--device cpu]

Baselines: "bare" is ``model(x)`` under ``torch.inference_mode``; "featlab" captures every skip
point with ``featlab.capture`` (a copy per hook call); "hooks, no copy" stores references the way
timm's FeatureHooks does (unsafe under in-place ops: shown only to price the copy).
"""

from __future__ import annotations

import argparse
import time

import torch

import featlab
from featlab.data import load_dataset


def shapes_rate(size: int, n: int) -> float:
    ds = load_dataset("shapes", split="train", size=size, length=n)
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


def timed(fn, batches: list[torch.Tensor], repeats: int) -> float:
    """Best images/s over ``repeats`` passes over ``batches`` (after one warm-up batch)."""
    fn(batches[0])
    best = 0.0
    for _ in range(repeats):
        if batches[0].is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in batches:
            fn(x)
        if batches[0].is_cuda:
            torch.cuda.synchronize()
        best = max(best, sum(len(x) for x in batches) / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    for size in (64, args.size, 256):
        print(f"shapes generation at {size:>3} px: {shapes_rate(size, 200):8.0f} images/s")

    model, spec = featlab.get_backbone(args.model, weights="none")
    model = model.to(args.device)
    points = featlab.skip_points(model, input_size=args.size)
    ds = load_dataset("shapes", split="val", size=args.size)
    batches = []
    for b in range(args.batches):
        idx = range(b * args.batch_size, (b + 1) * args.batch_size)
        x = torch.stack([ds[i]["image"] for i in idx])
        batches.append(spec.normalize(x).to(args.device))

    def bare(x):
        with torch.inference_mode():
            model(x)

    def with_featlab(x):
        with torch.inference_mode(), featlab.capture(model, points):
            model(x)

    def with_reference_hooks(x):
        store = {}
        modules = dict(model.named_modules())
        handles = [
            modules[p.module].register_forward_hook(
                lambda m, i, o, name=p.name: store.__setitem__(name, o))
            for p in points
        ]
        try:
            with torch.inference_mode():
                model(x)
        finally:
            for h in handles:
                h.remove()

    rates = {
        "bare forward": timed(bare, batches, args.repeats),
        "featlab.capture (all points, copied)": timed(with_featlab, batches, args.repeats),
        "hooks storing references (no copy)": timed(with_reference_hooks, batches, args.repeats),
    }
    base = rates["bare forward"]
    print(f"\n{args.model} at {args.size} px, batch {args.batch_size}, {len(points)} skip points")
    print(f"{'variant':<40} {'images/s':>10} {'vs bare':>8}")
    for name, rate in rates.items():
        print(f"{name:<40} {rate:10.1f} {rate / base:8.2f}")


if __name__ == "__main__":
    main()
