"""How fast the embedded ``shapes`` data set is generated (images/s, CPU).

Prints, for 64, 128 and 256 px: ``render_scene`` alone (numpy arrays), the data set's
``__getitem__`` (float tensors, what training sees), both in one process, and a
``torch.utils.data.DataLoader`` with 2 worker processes (batch 32):

    python benchmarks/bench_shapes.py [--n 1000] [--repeats 3]

Each figure is the best of ``--repeats`` passes (the machine's other load only slows a pass).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from featlab.data import load_dataset, render_scene


def best_rate(fn, n: int, repeats: int) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000, help="images per pass")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core: numpy here is single-threaded anyway
    print(f"torch {torch.__version__}, numpy {np.__version__}, {os.cpu_count()} CPUs; "
          f"{args.n} images per pass, best of {args.repeats}")
    loader_title = f"DataLoader x{args.workers}"
    print(f"{'size':>5} {'render_scene':>14} {'dataset[i]':>12} {loader_title:>16}")
    for size in (64, 128, 256):
        ds = load_dataset("shapes", "train", size=size, length=args.n)

        def scenes():
            for i in range(args.n):
                render_scene(np.random.default_rng([0, 0, i]), size)

        def items():
            for i in range(args.n):
                ds[i]

        def loader():
            for _ in DataLoader(ds, batch_size=32, num_workers=args.workers):
                pass

        rates = [best_rate(f, args.n, args.repeats) for f in (scenes, items, loader)]
        print(f"{size:>5} {rates[0]:>14.0f} {rates[1]:>12.0f} {rates[2]:>16.0f}")


if __name__ == "__main__":
    main()
