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


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear probe per skip point: fit on --train, score on --val, write CSV + JSON."""
    from pathlib import Path

    from featlab.analysis.probe import probe_points, write_result

    out = Path(args.out) if args.out else Path(args.train).with_suffix("").with_name(
        Path(args.train).stem + ".probe")
    for p in (Path(f"{out.with_suffix('') if out.suffix in ('.json', '.csv') else out}{s}")
              for s in (".json", ".csv")):
        if p.exists() and not args.force:
            from featlab.errors import ConfigError

            raise ConfigError(f"probe results must not overwrite {str(p)!r} without --force; "
                              "it exists. Fix: pass --force or another --out.")
    result = probe_points(args.train, args.val, args.points, alpha=args.alpha,
                          class_weight=args.class_weight, max_pixels=args.max_pixels,
                          standardize=not args.no_standardize, null=args.null, seed=args.seed,
                          device=args.device, batch_size=args.batch_size,
                          progress=not args.quiet)
    write_result(result, out, force=args.force)
    if args.json:
        _print_json(result.to_dict())
        return 0
    cols = ["point", "stride", "channels", "pixel_accuracy", "mean_accuracy", "miou", "alpha"]
    cols += ["null_miou"] if args.null else []
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else v  # noqa: E731
    print(_table([[fmt(r[c]) for c in cols] for r in result.rows()], cols))
    print(f"\nlinear probes of {len(result.rows())} points -> {out}.json, {out}.csv")
    return 0


def cmd_saliency(args: argparse.Namespace) -> int:
    """Saliency maps per skip point on a data set: a PNG grid and a pointing-game summary."""
    from pathlib import Path

    from featlab.analysis.saliency_summary import (plot_saliency_grid, saliency_examples,
                                                   saliency_summary, write_summary)
    from featlab.data import load_dataset
    from featlab.errors import ConfigError
    from featlab.models import get_backbone

    out = Path(args.out)
    grid = out / f"saliency_{args.method}.png"
    if not args.force and any(p.exists() for p in (grid, out / "saliency.json")):
        raise ConfigError(f"saliency results must not overwrite files in {str(out)!r} without "
                          "--force; they exist. Fix: pass --force or another --out.")
    model, spec = get_backbone(args.model, weights=args.weights)
    ds = load_dataset(args.data, split=args.split, root=args.root, size=args.size or
                      spec.input_size)
    kwargs = dict(method=args.method, spec=spec, relu=not args.no_relu, seed=args.seed,
                  device=args.device)
    result = saliency_summary(model, ds, args.points, limit=args.limit,
                              batch_size=args.batch_size, progress=not args.quiet, **kwargs)
    examples = saliency_examples(model, ds, args.points, count=min(args.show, len(ds)),
                                 **kwargs)
    plot_saliency_grid(examples, grid, class_names=ds.classes,
                       title=f"{args.method} - {args.model} ({args.weights}) on {args.data}")
    write_summary(result, out, force=args.force)
    if args.json:
        _print_json(result.to_dict())
        return 0
    cols = ["point", "stride", "energy_in_mask", "energy_std", "mask_fraction", "samples"]
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else v  # noqa: E731
    print(_table([[fmt(r[c]) for c in cols] for r in result.rows()], cols))
    print(f"\n{args.method} on {args.model}: grid {grid}, summary {out / 'saliency.json'}")
    return 0


def _fmt(value: object, digits: int = 4) -> object:
    return f"{value:.{digits}f}" if isinstance(value, float) else value


def cmd_analyze_resolution(args: argparse.Namespace) -> int:
    """Size, stride, receptive fields and resolution ceiling per point of a cache."""
    from featlab.analysis._io import check_writable, output_stem
    from featlab.analysis.resolution import (erf_inputs_from_cache, resolution_table,
                                             write_result)
    from featlab.cache.reader import open_cache

    cache = open_cache(args.cache)
    stem = output_stem(cache.path, "resolution", args.out)
    check_writable(stem, force=args.force)
    model = images = None
    if args.erf:
        model, images = erf_inputs_from_cache(cache, args.erf)
    result = resolution_table(cache, model=model, images=images, device=args.device,
                              progress=not args.quiet)
    paths = write_result(result, stem, force=args.force)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    if args.json:
        _print_json(result.to_dict(with_maps=False))
        return 0
    cols = ["point", "channels", "size", "width", "stride", "rf_size", "rf_stride", "rf_padding",
            "ceiling_miou_nearest", "ceiling_miou_majority"]
    cols += ["erf_radius50", "erf_radius90"] if args.erf else []
    heads = [c.replace("ceiling_miou_", "ceiling_") for c in cols]
    print(_table([[_fmt(r.get(c)) for c in cols] for r in result.rows()], heads))
    print(f"\n{len(result.points)} points of {cache.path} ({result.num_images} label maps) -> "
          f"{paths[0]}, {paths[1]}")
    return 0


def cmd_analyze_cka(args: argparse.Namespace) -> int:
    """The CKA matrix between the skip points of a cache (or across two caches)."""
    from pathlib import Path

    from featlab.analysis._io import check_writable, output_stem
    from featlab.analysis.similarity import cka_matrix, write_result
    from featlab.cache.reader import open_cache

    cache = open_cache(args.cache)
    cache2 = None if args.cache2 is None else open_cache(args.cache2)
    tag = f"cka-{args.kind}-{args.spatial}"
    if cache2 is not None:
        tag += f"-vs-{Path(str(cache2.path).removesuffix('.partial')).stem}"
    stem = output_stem(cache.path, tag, args.out)
    check_writable(stem, force=args.force)
    result = cka_matrix(cache, cache2, args.kind, points=args.points, points2=args.points2,
                        spatial=args.spatial, estimator=args.estimator,
                        bandwidth=args.bandwidth, batch_size=args.batch_size,
                        positions=args.positions, seed=args.seed, device=args.device,
                        progress=not args.quiet)
    paths = write_result(result, stem, force=args.force)
    log.info("wrote %s", ", ".join(str(p) for p in paths))
    if args.json:
        _print_json(result.to_dict())
        return 0
    heads = ["point"] + [str(j) for j in range(len(result.columns))]
    print(_table([[name] + [_fmt(None if v != v else float(v), 3) for v in row]
                  for name, row in zip(result.names, result.matrix)], heads))
    legend = ", ".join(f"{j}={c}" for j, c in enumerate(result.columns))
    print(f"\ncolumns: {legend}")
    print(f"{args.kind} CKA ({result.estimator}, {result.spatial}, {result.form} form) over "
          f"{result.num_samples} samples -> {paths[0]}, {paths[1]}")
    for key, reason in result.nan_reasons.items():
        print(f"NaN for {key}: {reason}")
    return 0


def _head_overrides(args: argparse.Namespace) -> dict:
    keys = ("fusion", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "mid_channels")
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if getattr(args, "finetune", False):
        out["finetune"] = True
    return out


def cmd_train_head(args: argparse.Namespace) -> int:
    """Train a baseline or single-skip segmentation head from two caches."""
    from featlab.segment.train import HeadSettings, train_head

    settings = HeadSettings(skip=args.skip, seed=args.seed, **_head_overrides(args))
    result = train_head(args.train, args.val, settings, out=args.out, device=args.device,
                        progress=not args.quiet, force=args.force,
                        preload=not args.no_preload)
    if os.environ.get("RANK", "0") != "0":
        return 0
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(_table([[h["epoch"], f"{h['loss']:.4f}", f"{h['val_miou']:.4f}",
                   f"{h['val_pixel_accuracy']:.4f}", h["seconds"]] for h in result.history],
                 ["epoch", "loss", "val mIoU", "val pixel acc", "train s"]))
    kind = f"skip {args.skip} ({settings.fusion})" if args.skip else "baseline"
    print(f"\n{kind}: val mIoU {result.miou:.4f}, pixel accuracy {result.pixel_accuracy:.4f}, "
          f"mean accuracy {result.mean_accuracy:.4f} ({result.train_images_per_second:.0f} "
          f"train images/s, {result.seconds:.0f} s, {result.world_size} process(es)) -> "
          f"{result.folder}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Baseline vs one single-skip head per point, over seeds; which properties predict gain."""
    from pathlib import Path

    from featlab.errors import ConfigError
    from featlab.segment import runs
    from featlab.segment.sweep import predictors, property_table, sweep, write_sweep
    from featlab.segment.train import HeadSettings

    out = Path(args.out) if args.out else Path(args.train).resolve().parent / "sweep"
    if (out / "sweep.json").exists() and not args.force:
        raise ConfigError(f"the sweep folder must not hold a finished sweep; {out} has "
                          "sweep.json. Fix: pass --force to train every run again, or choose "
                          "another --out.")
    seeds = args.seed_list if args.seed_list else args.seeds
    result = sweep(args.train, args.val, args.points, seeds,
                   HeadSettings(**_head_overrides(args)), out=out, device=args.device,
                   progress=not args.quiet, force=args.force, bootstrap=args.bootstrap)
    paths = write_sweep(result, out)
    preds, notes = [], []
    if not args.no_properties:
        props = property_table(args.train, args.val, list(result.points), notes=notes)
        preds = predictors(result, props)
        runs.write_json(out / "predictors.json", {"properties": props, "predictors": preds,
                                                  "notes": notes})
        paths.append(out / "predictors.json")
    if args.json:
        _print_json({"sweep": result.to_dict(), "rows": result.rows(), "predictors": preds,
                     "notes": notes})
        return 0

    def ci(pair):
        return "-" if not pair or pair[0] is None else f"[{pair[0]:+.4f}, {pair[1]:+.4f}]"

    rows = [[r["point"], r["stride"], f"{r['miou_mean']:.4f}",
             "-" if r["miou_std"] is None else f"{r['miou_std']:.4f}",
             " ".join(f"{v:.4f}" for v in r["per_seed"]), f"{r['gain']:+.4f}",
             ci(r["gain_ci_seeds"]), ci(r["gain_ci_images"]),
             {True: "yes", False: "no", None: "-"}[r["beats_2std"]], r["rank"]]
            for r in result.rows()]
    print(_table(rows, ["point", "stride", "mIoU", "std", "per seed", "gain", "CI seeds",
                        "CI images", "> 2 std", "rank"]))
    if preds:
        print("\nSpearman correlation of each property with the gain across points:")
        print(_table([[p["property"], p["spearman_rho"], p["p_value"], p["n_points"]]
                      for p in preds], ["property", "rho", "p", "points"]))
    for note in notes:
        print(f"note: {note}")
    print(f"\n{len(result.points) + 1} configurations x {len(result.seeds)} seeds in "
          f"{result.seconds:.0f} s -> {', '.join(str(p) for p in paths)}")
    return 0


def _add_head_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", required=True, help="cache of the training split (.h5)")
    p.add_argument("--val", required=True, help="cache of the validation split (.h5)")
    p.add_argument("--fusion", choices=["sum", "concat"], help="skip fusion (default sum)")
    p.add_argument("--epochs", type=int, help="epochs (default 8)")
    p.add_argument("--batch-size", type=int, help="global batch size (default 16)")
    p.add_argument("--lr", type=float, help="peak learning rate, poly decay (default 3e-3)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], help="default adamw")
    p.add_argument("--weight-decay", type=float, help="on conv weights (default 1e-4)")
    p.add_argument("--mid-channels", type=int, help="concat fusion width (default 64)")
    p.add_argument("--finetune", action="store_true",
                   help="run and train the backbone on the images (default: frozen, from caches)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--force", action="store_true", help="replace existing runs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


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

    p = sub.add_parser("probe", parents=[common],
                       help="per-pixel linear probe at every skip point (train -> val caches)")
    p.add_argument("--train", required=True, help="train-split cache (.h5)")
    p.add_argument("--val", required=True, help="val-split cache (.h5) of the same model")
    p.add_argument("--points", default="all",
                   help="all | stages | glob (layer3.*) | re:REGEX | comma-separated names")
    p.add_argument("--alpha", type=float,
                   help="L2 strength per pixel (default: chosen on held-out train images)")
    p.add_argument("--class-weight", choices=["balanced"], help="weight classes by 1/frequency")
    p.add_argument("--max-pixels", type=int, default=100_000,
                   help="training pixels sampled per point (default 100000)")
    p.add_argument("--no-standardize", action="store_true", help="do not standardise features")
    p.add_argument("--null", action="store_true",
                   help="also fit on spatially shuffled labels (null baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16, help="images read at a time")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--out", help="result path without suffix (default: next to --train, "
                   "TRAIN.probe.json/.csv)")
    p.add_argument("--force", action="store_true", help="overwrite an existing result")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("saliency", parents=[common],
                       help="saliency / Grad-CAM maps at every skip point: PNG grid + summary")
    p.add_argument("--model", required=True, help="backbone name, see `featlab models`")
    p.add_argument("--weights", default="shapes", help="none | imagenet | shapes | PATH")
    p.add_argument("--data", default="shapes", help="data set name, see `featlab datasets`")
    p.add_argument("--root", help="folder of the data set (not for shapes)")
    p.add_argument("--split", default="val")
    p.add_argument("--size", type=int, help="input side in pixels (default: the weights' size)")
    p.add_argument("--points", default="stages",
                   help="stages | all | glob | names, and/or 'input' (comma-separated)")
    p.add_argument("--method", default="gradcam", choices=["gradcam", "saliency", "smoothgrad",
                                                           "ig"])
    p.add_argument("--no-relu", action="store_true", help="Grad-CAM without the final ReLU")
    p.add_argument("--limit", type=int, default=64, help="samples summarised (default 64)")
    p.add_argument("--show", type=int, default=4, help="samples drawn in the grid (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="SmoothGrad noise seed")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cpu, where the model is)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite existing results")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_saliency)

    p = sub.add_parser("analyze",   # no common options here: the leaves take them
                       help="layer properties of a cache: resolution, CKA similarity")
    analyses = p.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    p = analyses.add_parser("resolution", parents=[common],
                            help="size, stride, receptive fields, resolution ceiling per point")
    p.add_argument("cache", help="the .h5 cache (its points, labels, classes)")
    p.add_argument("--erf", type=int, metavar="N", default=0,
                   help="also the effective receptive field on the first N stored images "
                        "(needs --save-images at extraction and the same local weights)")
    p.add_argument("--device", help="cpu | cuda | cuda:N for --erf (default: cuda when available)")
    p.add_argument("--out", help="result path without suffix (default: next to the cache, "
                   "CACHE.resolution.json/.csv)")
    p.add_argument("--force", action="store_true", help="overwrite an existing result")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_analyze_resolution)

    p = analyses.add_parser("cka", parents=[common],
                            help="CKA similarity matrix between skip points (or two caches)")
    p.add_argument("cache", help="the .h5 cache")
    p.add_argument("cache2", nargs="?", help="a second cache of the same samples (cross-model)")
    p.add_argument("--kind", default="linear", choices=["linear", "rbf", "minibatch"])
    p.add_argument("--spatial", default="gap", choices=["gap", "pixels", "flatten"],
                   help="gap: pooled per image; pixels: sampled positions; flatten: whole maps")
    p.add_argument("--points", help="selection in CACHE (default all stored points)")
    p.add_argument("--points2", help="selection in CACHE2 (default: as --points)")
    p.add_argument("--estimator", choices=["biased", "debiased"],
                   help="HSIC estimator (default biased; minibatch is always debiased)")
    p.add_argument("--bandwidth", type=float, default=1.0,
                   help="rbf: sigma as a fraction of the median distance (default 1.0)")
    p.add_argument("--batch-size", type=int, default=256, help="minibatch: images per batch")
    p.add_argument("--positions", type=int, default=16, help="pixels: positions per image")
    p.add_argument("--seed", type=int, default=0, help="batches and positions seed")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--out", help="result path without suffix (default: next to the cache, "
                   "CACHE.cka-KIND-SPATIAL.json/.csv)")
    p.add_argument("--force", action="store_true", help="overwrite an existing result")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_analyze_cka)

    p = sub.add_parser("train-head", parents=[common],
                       help="train a segmentation head (baseline or one skip) from two caches")
    _add_head_options(p)
    p.add_argument("--skip", help="skip point, e.g. layer2.1 (omit for the baseline)")
    p.add_argument("--seed", type=int, default=0, help="head init and shuffling seed")
    p.add_argument("--out", help="run folder (default TRAIN_DIR/heads/RUN_NAME)")
    p.add_argument("--no-preload", action="store_true",
                   help="read features per batch instead of loading them into memory")
    p.set_defaults(func=cmd_train_head)

    p = sub.add_parser("sweep", parents=[common],
                       help="baseline vs a single skip per point over seeds; what predicts gain")
    _add_head_options(p)
    p.add_argument("--points", default="stages",
                   help="skip points: stages | all | glob | comma-separated names")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 (default 3)")
    p.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds instead of --seeds")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of images")
    p.add_argument("--no-properties", action="store_true",
                   help="skip the property join (probe, ceiling, CKA) and the correlations")
    p.add_argument("--out", help="sweep folder (default TRAIN_DIR/sweep)")
    p.set_defaults(func=cmd_sweep)
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
