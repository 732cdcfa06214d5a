"""``featlab demo``: the whole study on the embedded data set, one command after another.

Each step prints the ``featlab`` command it runs, so the demo doubles as a tour of the CLI:
pretrain a backbone on ``shapes`` (cached), list its skip points and capture them, extract
train/val caches of the ``stages`` points, and run the single-skip sweep with the property join
(resolution ceiling, CKA to the last point, probe mIoU). Every step reuses what an earlier run
left in ``--out``: a second ``make demo`` only prints.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from featlab.cli._output import _table


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``featlab demo`` to the ``featlab`` parser."""
    p = sub.add_parser("demo", parents=[common],
                       help="the whole study on shapes: pretrain, skip points, caches, sweep")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=128, help="input side in pixels (default 128)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default="featlab-demo",
                   help="folder for the caches and the sweep (default ./featlab-demo)")
    p.add_argument("--train-samples", type=int, default=400)
    p.add_argument("--val-samples", type=int, default=150)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--fusion", default="concat", choices=["sum", "concat"])
    p.add_argument("--pretrain-steps", type=int,
                   help="pretraining steps (default: the measured recipe, 600); fewer for a "
                        "quick look at untrained-ish features")
    p.add_argument("--no-sweep", action="store_true",
                   help="stop after the caches (the sweep takes several minutes on a CPU)")
    p.set_defaults(func=cmd_demo)


def _run(argv: list[str], quiet: bool) -> None:
    """Print a ``featlab`` command line and run it; its errors end the demo."""
    from featlab.cli import main
    from featlab.errors import ConfigError

    print(f"$ featlab {shlex.join(argv)}", flush=True)
    code = main(argv + (["--quiet"] if quiet else []))
    if code:
        raise ConfigError(f"the demo step `featlab {shlex.join(argv)}` must succeed; it exited "
                          f"with {code}. Fix: see its message above.")


def _complete(path: Path, samples: int) -> bool:
    from featlab.cache.reader import open_cache

    if not path.is_file():
        return False
    cache = open_cache(path, allow_partial=False)
    return cache.complete and len(cache) == samples


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain -> skip points -> capture -> caches -> sweep with the property join."""
    import torch

    import featlab
    from featlab.pretrain import pretrain

    steps = 4 if args.no_sweep else 5
    overrides = {} if args.pretrain_steps is None else {"steps": args.pretrain_steps}
    result = pretrain(args.model, data="shapes", progress=not args.quiet, **overrides)
    weights = f"shapes:{result.key}"  # exactly the checkpoint trained or reused here
    print(f"[1/{steps}] {args.model} trained on shapes: val accuracy {result.accuracy:.3f} "
          f"(chance {result.chance:.3f}) -> {result.checkpoint}"
          + (" (reused)" if result.reused else f" ({result.seconds:.0f} s)"))

    model, spec = featlab.get_backbone(args.model, weights=weights)
    points = featlab.skip_points(model, input_size=args.size)
    print(f"[2/{steps}] {len(points)} skip points at {args.size} px:")
    print(_table([[p.index, p.name, p.channels, f"{p.size[0]}x{p.size[1]}", p.stride, p.rf_size]
                  for p in points], ["#", "name", "C", "HxW", "stride", "rf"]))

    ds = featlab.load_dataset("shapes", split="val", size=args.size)
    x = spec.normalize(torch.stack([ds[i]["image"] for i in range(args.batch_size)]))
    with torch.inference_mode():
        model(x)  # warm-up
        t0 = time.perf_counter()
        model(x)
        bare = time.perf_counter() - t0
        with featlab.capture(model, points) as acts:
            t0 = time.perf_counter()
            model(x)
            captured = time.perf_counter() - t0
        total = sum(t.numel() * t.element_size() for t in acts.values())
    print(f"[3/{steps}] captured all {len(acts)} points on a batch of {args.batch_size}: "
          f"{total / 2**20:.1f} MiB; bare forward {args.batch_size / bare:.0f} images/s, with "
          f"capture {args.batch_size / captured:.0f} images/s")

    out = Path(args.out)
    caches = {"train": (out / "train.h5", args.train_samples),
              "val": (out / "val.h5", args.val_samples)}
    print(f"[4/{steps}] activation caches of the stages points:")
    for split, (path, n) in caches.items():
        if _complete(path, n):
            print(f"$ featlab inspect {path}   # already extracted")
            continue
        _run(["extract", "--model", args.model, "--weights", weights, "--data", "shapes",
              "--split", split, "--points", "stages", "--input-size", str(args.size),
              "--limit", str(n), "--out", str(path)], args.quiet)
    if args.no_sweep:
        return 0

    sweep_dir = out / "sweep"
    print(f"[5/{steps}] which single skip helps, and which property predicts it:")
    if (sweep_dir / "sweep.json").exists():
        print(f"already done: {sweep_dir / 'sweep.csv'} and {sweep_dir / 'predictors.json'} "
              f"(delete {sweep_dir} to run it again)")
        return 0
    _run(["sweep", "--train", str(caches["train"][0]), "--val", str(caches["val"][0]),
          "--points", "stages", "--seeds", str(args.seeds), "--epochs", str(args.epochs),
          "--fusion", args.fusion, "--out", str(sweep_dir)], args.quiet)
    return 0
