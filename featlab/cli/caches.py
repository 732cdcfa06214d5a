"""Commands that write and check activation caches: extract, merge, inspect, verify."""

from __future__ import annotations

import argparse
import json

from featlab.cli._output import _is_main, _print_json, _table


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this module's sub-commands to the ``featlab`` parser."""
    p = sub.add_parser("extract", parents=[common],
                       help="write skip-point activations of a data set to an HDF5 cache")
    p.add_argument("--model", required=True, help="backbone name, see `featlab models`")
    p.add_argument("--weights", required=True,
                   help="none (random init: say so, a cache of it is rarely what one wants) | "
                        "imagenet | shapes | shapes:KEY | PATH")
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
    p.add_argument("--error-stat", default="bound", choices=["bound", "exact"],
                   help="float16 rounding error recorded per sample and point: bound (half the "
                        "float16 spacing at the largest stored value; default) or exact "
                        "(max |x - stored|; a few %% slower on the CPU)")
    p.add_argument("--max-size", type=int,
                   help="area-pool each point to at most this grid side (0: no pooling, the "
                        "default)")
    p.add_argument("--max-channels", type=int,
                   help="store at most this many channels of each point (a seeded random subset, "
                        "recorded in the cache; 0: all, the default)")
    p.add_argument("--channel-seed", type=int, default=0,
                   help="seed of the channel subsets (default 0)")
    p.add_argument("--limit", type=int, help="only the first N samples of the sorted order")
    p.add_argument("--save-images", action="store_true", help="also store the input images (uint8)")
    p.add_argument("--compression", default="none", choices=["none", "lzf", "gzip"],
                   help="compress points, labels and images when the cache is finalised "
                        "(a pass over the cache at the end; default none)")
    p.add_argument("--out", required=True, help="the cache file (.h5)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--workers", "--num-workers", dest="workers", type=int,
                   help="data loader workers (Python: num_workers; default: by CPU count)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the stored shapes, sizes, free disk and memory; write nothing")
    p.add_argument("--no-disk-check", action="store_true",
                   help="start even when the free disk space looks too small")
    p.add_argument("--force", action="store_true",
                   help="replace an existing cache (complete or partial)")
    p.add_argument("--json", action="store_true", help="print the result (or the plan) as JSON")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("merge", parents=[common],
                       help="join the shards of a torchrun extraction into one cache")
    p.add_argument("inputs", nargs="+", metavar="SHARDS",
                   help="shard files (rank-R-of-K.h5), folders holding them, or a sharded cache")
    p.add_argument("--out", required=True, help="the merged cache file (.h5)")
    p.add_argument("--virtual", action="store_true",
                   help="write only virtual datasets over the shards where they are (no copy; "
                        "the shards must stay beside it)")
    p.add_argument("--compression", default="same", choices=["same", "none", "lzf", "gzip"],
                   help="compression of the copy (default: the shards')")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_merge, loads=())  # HDF5 and numpy only

    p = sub.add_parser("inspect", parents=[common], help="summarise an activation cache")
    p.add_argument("cache", help="path of the .h5 cache (or its .partial while being written)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_inspect, loads=())  # HDF5 and numpy only

    p = sub.add_parser("verify", parents=[common],
                       help="read a whole cache once and check shapes, flags, values, metadata")
    p.add_argument("cache")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_verify, loads=())  # HDF5 and numpy only


def cmd_extract(args: argparse.Namespace) -> int:
    """Stream skip-point activations of a data set into an HDF5 cache (or --dry-run: estimate)."""
    from featlab.cache.plan import format_bytes
    from featlab.cache.writer import estimate, extract
    from featlab.data import load_dataset
    from featlab.distributed import info_from_env
    from featlab.errors import ConfigError
    from featlab.models import get_backbone

    if args.dry_run and not _is_main():  # under torchrun, rank 0 speaks for the job
        return 0
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
    size = spec.input_size if args.input_size is None else args.input_size
    ds = load_dataset(args.data, split=args.split, root=args.root, size=size, seed=args.data_seed,
                      **options)
    kwargs = dict(spec=spec, batch_size=args.batch_size, dtype=args.dtype,
                  max_size=args.max_size, limit=args.limit, max_channels=args.max_channels,
                  channel_seed=args.channel_seed, save_images=args.save_images,
                  compression=args.compression, device=args.device, num_workers=args.workers)
    if args.dry_run:
        plan = estimate(model, ds, args.points, args.out, force=args.force, **kwargs)
        if args.json:
            _print_json(plan.to_dict())
            return 0
        n, world = plan.num_samples, info_from_env().world_size
        rows = [[p.name, p.channels if p.stored_channels == p.channels
                 else f"{p.stored_channels} of {p.channels}", f"{p.size[0]}x{p.size[1]}",
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
        if plan.compression:
            print(f"--compression {plan.compression}: the final file is smaller; while it is "
                  f"made the disk holds up to {format_bytes(plan.disk_bytes)} (the uncompressed "
                  "partial file and the compressed copy)")
        each = "" if world == 1 else f" in each of the {world} processes"
        print(f"host memory in flight: about {format_bytes(plan.host_bytes)}{each} (batch "
              f"{plan.batch_size}; does not grow with N)")
        if plan.device_bytes:
            print(f"device memory: about {format_bytes(plan.device_bytes)}{each} (weights "
                  f"{format_bytes(plan.weight_bytes)} and the forward at batch "
                  f"{plan.batch_size}; the CUDA context and cuDNN workspace come on top)")
        elif args.keeps_freed_memory:  # a CPU run
            print("on the CPU this command keeps freed memory for speed, which can raise the "
                  "process peak above that (FEATLAB_KEEP_MEMORY=0 turns it off)")
        if plan.existing is not None:
            print(f"note: {plan.existing}")
        return 0
    result = extract(model, ds, args.points, args.out, force=args.force,
                     error_stat=args.error_stat, disk_check=not args.no_disk_check,
                     progress=not args.quiet, **kwargs)
    if not _is_main():
        return 0
    if args.json:
        _print_json(result.to_dict())
    else:  # on stdout, with --quiet too, like every command's result
        print(f"{result.path}: {len(result.points)} points x {result.num_samples} samples, "
              f"{format_bytes(result.bytes)} ({result.written} written now, {result.skipped} "
              "already there)")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    """Check that the shards are one whole extraction, then copy them into one file (or join
    them with virtual datasets)."""
    from featlab.cache.merge import merge_shards

    result = merge_shards(args.inputs, args.out, virtual=args.virtual,
                          compression=args.compression, force=args.force,
                          progress=not args.quiet)
    if args.json:
        _print_json(result.to_dict())
    else:
        from featlab.cache.plan import format_bytes

        how = "virtual datasets over" if result.virtual else "a copy of"
        print(f"{result.path}: {result.num_samples} samples, {how} {len(result.shards)} shards "
              f"({format_bytes(result.bytes)})")
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
