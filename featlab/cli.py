"""The ``featlab`` command: parse arguments, call the library, print.

Heavy modules are imported inside each command so that ``featlab --help`` is instant. Errors
that featlab raises on purpose (``FeatlabError``) become one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Sequence

from featlab import __version__
from featlab.errors import FeatlabError

log = logging.getLogger("featlab")


# ----------------------------------------------------------------------------- output helpers
def _table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Format rows as a plain fixed-width table (numbers right-aligned)."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)
        ).rstrip()

    lines = [fmt(list(headers)), fmt(["-" * w for w in widths])]
    lines += [fmt(r) for r in cells]
    return "\n".join(lines)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True


def _print_json(obj: object) -> None:
    print(json.dumps(obj, indent=2))


# ----------------------------------------------------------------------------- commands
def cmd_models(args: argparse.Namespace) -> int:
    from featlab import models

    rows = [models.describe_backbone(name) for name in models.list_backbones()]
    if args.json:
        _print_json(rows)
        return 0
    print(
        _table(
            [[r["name"], r["imagenet_file"], "yes" if r["imagenet_local"] else "no",
              "yes" if r["shapes_local"] else "no"] for r in rows],
            ["model", "imagenet weights file", "imagenet here", "shapes-trained here"],
        )
    )
    print(f"\nImageNet weights are read from {models.hub_checkpoint_dir()} (never downloaded).")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from featlab import data

    rows = [data.describe_dataset(name) for name in data.list_datasets()]
    if args.json:
        _print_json(rows)
        return 0
    print(_table([[r["name"], r["classes"], r["layout"]] for r in rows],
                 ["data set", "classes", "on-disk layout under --root"]))
    return 0


def cmd_points(args: argparse.Namespace) -> int:
    from featlab.models import get_backbone
    from featlab.points import skip_points

    model, _ = get_backbone(args.model, weights=args.weights)
    points = skip_points(model, input_size=args.input_size, select=args.select)
    if args.json:
        _print_json([p.to_dict() for p in points])
        return 0
    rows = [
        [p.index, p.name, p.channels, f"{p.size[0]}x{p.size[1]}", p.stride,
         p.rf_size, p.rf_stride, p.rf_padding, p.rf_status]
        for p in points
    ]
    print(_table(rows, ["#", "name", "C", "HxW", "stride", "rf", "rf_stride", "rf_pad", "rf status"]))
    print(f"\n{len(points)} skip points of {args.model} at input {args.input_size} px "
          f"(selection {args.select!r}).")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from featlab.pretrain import PretrainSettings, pretrain

    overrides = {
        k: v for k, v in vars(args).items()
        if k in PretrainSettings.__dataclass_fields__ and v is not None
    }
    settings = PretrainSettings(**overrides)
    result = pretrain(args.model, data=args.data, settings=settings, device=args.device,
                      progress=not args.quiet, force=args.force)
    if args.json:
        _print_json(result.to_dict())
        return 0
    verb = "reused" if result.reused else "trained"
    print(
        f"{args.model} {verb} on {args.data}: val accuracy {result.accuracy:.3f} "
        f"(chance {result.chance:.3f}, majority prior {result.prior:.3f}) "
        f"in {result.seconds:.0f} s -> {result.checkpoint}"
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded end-to-end job: backbone -> skip points -> capture on a batch of shapes."""
    import torch

    import featlab
    from featlab.pretrain import pretrain

    result = pretrain(args.model, data="shapes", progress=not args.quiet)
    print(f"[1/3] {args.model} trained on shapes: val accuracy {result.accuracy:.3f} "
          f"(chance {result.chance:.3f}) -> {result.checkpoint}"
          + (" (reused)" if result.reused else f" ({result.seconds:.0f} s)"))

    model, spec = featlab.get_backbone(args.model, weights="shapes")
    points = featlab.skip_points(model, input_size=args.size)
    print(f"[2/3] {len(points)} skip points at {args.size} px:")
    print(_table([[p.index, p.name, p.channels, f"{p.size[0]}x{p.size[1]}", p.stride, p.rf_size]
                  for p in points], ["#", "name", "C", "HxW", "stride", "rf"]))

    ds = featlab.load_dataset("shapes", split="val", size=args.size)
    batch = torch.stack([ds[i]["image"] for i in range(args.batch_size)])
    x = spec.normalize(batch)
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
        shapes = {name: tuple(t.shape) for name, t in acts.items()}
    print(f"[3/3] captured {len(shapes)} points on a batch of {args.batch_size} shapes images:")
    for name, shape in shapes.items():
        print(f"  {name:<28} {shape}")
    print(f"bare forward {args.batch_size / bare:.0f} images/s, with capture of all points "
          f"{args.batch_size / captured:.0f} images/s (ratio {bare / captured:.2f}); "
          f"{total / 2**20:.1f} MiB captured")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    """Stream skip-point activations of a data set into an HDF5 cache (or --dry-run: estimate)."""
    from featlab.cache.plan import format_bytes
    from featlab.cache.writer import estimate, extract
    from featlab.data import load_dataset
    from featlab.errors import ConfigError
    from featlab.models import get_backbone

    options = {}
    for item in args.option or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"`--option` must be KEY=VALUE; got {item!r}. Fix: e.g. "
                              "--option length=100.")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    model, spec = get_backbone(args.model, weights=args.weights, seed=args.seed)
    size = args.input_size or spec.input_size
    ds = load_dataset(args.data, split=args.split, root=args.root, size=size, seed=args.data_seed,
                      **options)
    kwargs = dict(spec=spec, batch_size=args.batch_size, dtype=args.dtype,
                  max_size=args.max_size, limit=args.limit, save_images=args.save_images,
                  device=args.device, num_workers=args.workers)
    if args.dry_run:
        plan = estimate(model, ds, args.points, args.out, **kwargs)
        if args.json:
            _print_json(plan.to_dict())
            return 0
        n = plan.num_samples
        rows = [[p.name, p.channels, f"{p.size[0]}x{p.size[1]}",
                 f"{p.stored_size[0]}x{p.stored_size[1]}", p.pooling, p.stride,
                 format_bytes(p.bytes_per_sample), format_bytes(p.total_bytes)]
                for p in plan.points]
        h, w = plan.input_size
        extra = [("labels", f"1x{h}x{w}", plan.label_bytes_per_sample)]
        if plan.save_images:
            extra.append(("images", f"3x{h}x{w}", plan.image_bytes_per_sample))
        extra.append(("ids, flags, stats", "-", plan.other_bytes_per_sample))
        rows += [[name, "-", shape, shape, "-", "-", format_bytes(b), format_bytes(b * n)]
                 for name, shape, b in extra]
        print(_table(rows, ["point", "C", "HxW", "stored", "pooling", "stride", "per sample",
                            f"total (N={n})"]))
        free = "unknown" if plan.free_bytes is None else format_bytes(plan.free_bytes)
        verdict = "fits" if plan.fits else "DOES NOT FIT (extract refuses; --no-disk-check)"
        print(f"\ncache {args.out}: {format_bytes(plan.total_bytes)} for {n} samples "
              f"({plan.dtype}, {format_bytes(plan.bytes_per_sample)} per sample); free disk "
              f"{free}: {verdict}")
        print(f"host memory in flight: about {format_bytes(plan.host_bytes)} (batch "
              f"{plan.batch_size}; does not grow with N)")
        return 0
    result = extract(model, ds, args.points, args.out, force=args.force,
                     disk_check=not args.no_disk_check, progress=not args.quiet, **kwargs)
    if args.json and os.environ.get("RANK", "0") == "0":
        _print_json(result.to_dict())
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from featlab.cache.summary import inspect_cache

    print(inspect_cache(args.cache, as_json=args.json))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Exit 0 when the cache is sound, 1 when problems were found (2: not a readable cache)."""
    from featlab.cache.verify import verify

    report = verify(args.cache, progress=not args.quiet)
    if args.json:
        _print_json(report.to_dict())
    else:
        print(report.text())
    return 0 if report.ok else 1


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featlab",
        description="Study the skip points of CNN backbones for semantic segmentation.",
    )
    parser.add_argument("--version", action="version", version=f"featlab {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("models", parents=[common], help="list the backbones and local weights")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", parents=[common], help="list the data sets and their layouts")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("points", parents=[common], help="list the skip points of a backbone")
    p.add_argument("model", help="backbone name, see `featlab models`")
    p.add_argument("--weights", default="none", help="none | imagenet | shapes | PATH (default none)")
    p.add_argument("--input-size", type=int, default=224, help="input side in pixels (default 224)")
    p.add_argument("--select", default="all",
                   help="all | stages | glob (layer3.*) | re:REGEX | comma-separated names")
    p.add_argument("--json", action="store_true", help="print a JSON list of SkipPoint records")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("pretrain", parents=[common],
                       help="train a backbone as a classifier on the embedded data set (cached)")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--data", default="shapes", choices=["shapes"])
    p.add_argument("--steps", type=int, help="optimizer steps")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="training image side in pixels")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--force", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", parents=[common],
                       help="pretrain on shapes (cached), list skip points, capture them on a batch")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("extract", parents=[common],
                       help="write skip-point activations of a data set to an HDF5 cache")
    p.add_argument("--model", required=True, help="backbone name, see `featlab models`")
    p.add_argument("--weights", default="none", help="none | imagenet | shapes | PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of a random init (--weights none)")
    p.add_argument("--data", required=True, help="data set name, see `featlab datasets`")
    p.add_argument("--root", help="folder of the data set (not for shapes)")
    p.add_argument("--split", default="val", help="split (default val)")
    p.add_argument("--data-seed", type=int, default=0, help="data set seed (shapes: which scenes)")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="data set option, e.g. length=100 (repeatable; JSON values)")
    p.add_argument("--points", default="stages",
                   help="all | stages | glob (layer3.*) | re:REGEX | comma-separated names")
    p.add_argument("--input-size", type=int,
                   help="side of the square network input (default: the weights' size)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--max-size", type=int, help="area-pool each point to at most this grid side")
    p.add_argument("--limit", type=int, help="only the first N samples of the sorted order")
    p.add_argument("--save-images", action="store_true", help="also store the input images (uint8)")
    p.add_argument("--out", required=True, help="the cache file (.h5)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--workers", type=int, help="data loader workers (default: by CPU count)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stored shapes, sizes, free disk and memory; write nothing")
    p.add_argument("--no-disk-check", action="store_true",
                   help="start even when the free disk space looks too small")
    p.add_argument("--force", action="store_true",
                   help="replace an existing cache (complete or partial)")
    p.add_argument("--json", action="store_true", help="print the result (or the plan) as JSON")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("inspect", parents=[common], help="summarise an activation cache")
    p.add_argument("cache", help="path of the .h5 cache (or its .partial while being written)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", parents=[common],
                       help="read a whole cache once and check shapes, flags, values, metadata")
    p.add_argument("cache")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
    return parser


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("featlab: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    if quiet:
        os.environ["FEATLAB_PROGRESS"] = "0"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featlab`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.quiet, args.verbose)
    try:
        return args.func(args)
    except FeatlabError as err:
        print(f"featlab {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("featlab: interrupted", file=sys.stderr)
        return 130


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
