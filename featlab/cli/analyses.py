"""Commands that measure layer properties: analyze resolution|cka, probe, saliency."""

from __future__ import annotations

import argparse
import logging
import warnings

from featlab.cli._output import _count, _fmt, _print_json, _table
from featlab.errors import FeatlabWarning

log = logging.getLogger("featlab")


def _result_options(p: argparse.ArgumentParser, default_out: str) -> None:
    """``--out``, ``--force`` and ``--json``, shared by the commands that write a result."""
    p.add_argument("--out", help=f"result path without suffix (default: {default_out})")
    p.add_argument("--force", action="store_true", help="overwrite an existing result")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _byte_size(text: str) -> int:
    """``--max-bytes``: bytes, or a number with K, M, G or T (powers of 1024; ``12G``, ``1.5T``).

    Examples:
        >>> _byte_size("12G"), _byte_size("500m"), _byte_size("4096")
        (12884901888, 524288000, 4096)
    """
    value, unit = text.strip().upper().removesuffix("B").removesuffix("I"), ""
    if value[-1:] in _UNITS:
        value, unit = value[:-1], value[-1]
    try:
        size = int(float(value) * _UNITS[unit])
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be a size in bytes, e.g. 12G, 500M or 4096; got "
                                         f"{text!r}")
    return size


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this module's sub-commands to the ``featlab`` parser."""
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
    _result_options(p, "next to the cache, CACHE.resolution.json/.csv")
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
    # None when not given, so that an option the chosen kind does not use can be named
    p.add_argument("--bandwidth", type=float,
                   help="rbf: sigma as a fraction of the median distance (default 1.0)")
    p.add_argument("--batch-size", type=int,
                   help="minibatch: images per batch (default 256)")
    p.add_argument("--positions", type=int,
                   help="pixels: positions per image (default 16)")
    p.add_argument("--seed", type=int, default=0, help="batches and positions seed")
    p.add_argument("--max-bytes", type=_byte_size, metavar="SIZE",
                   help="memory the float64 representations may take, e.g. 12G or 500M "
                        "(default: 80%% of what the process may still allocate, its job's "
                        "memory limit counted)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    _result_options(p, "next to the cache, CACHE.cka-KIND-SPATIAL.json/.csv")
    p.set_defaults(func=cmd_analyze_cka)

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
                   help="training pixels sampled per point (default 100000; 0: every labelled "
                   "pixel, which upsamples whole logit maps: fast while they fit in memory)")
    p.add_argument("--no-standardize", action="store_true", help="do not standardise features")
    p.add_argument("--null", action="store_true",
                   help="also fit on spatially shuffled labels (null baseline)")
    p.add_argument("--random-train", metavar="CACHE",
                   help="null baseline: train cache of the same samples from the same "
                   "architecture with random weights (featlab extract --weights none)")
    p.add_argument("--random-val", metavar="CACHE", help="its val cache (with --random-train)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the pixel sample, the held-out split and the label shuffle")
    p.add_argument("--batch-size", type=int, default=16, help="images read at a time")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    _result_options(p, "next to --train, TRAIN.probe.json/.csv")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("saliency", parents=[common],
                       help="saliency / Grad-CAM maps at every skip point: PNG grid + summary")
    p.add_argument("--model", required=True, help="backbone name, see `featlab models`")
    p.add_argument("--weights", default="shapes", help="none | imagenet | shapes | PATH")
    p.add_argument("--data", default="shapes", help="data set name, see `featlab datasets`")
    p.add_argument("--root", help="folder of the data set (not for shapes)")
    p.add_argument("--split", default="val")
    p.add_argument("--input-size", "--size", dest="size", type=int,
                   help="input side in pixels, as in extract (default: the weights' size)")
    p.add_argument("--points", default="stages",
                   help="stages | all | glob | names, and/or 'input' (comma-separated)")
    p.add_argument("--method", default="gradcam", choices=["gradcam", "layercam", "saliency",
                                                           "smoothgrad", "ig"],
                   help="gradcam (default) | layercam (keeps detail at early points) | saliency "
                   "| smoothgrad | ig")
    p.add_argument("--no-relu", action="store_true",
                   help="Grad-CAM / LayerCAM without the final ReLU")
    p.add_argument("--limit", type=int, default=64, help="samples summarised (default 64)")
    p.add_argument("--show", type=int, default=4, help="samples drawn in the grid (default 4)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="SmoothGrad noise seed")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite existing results")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_saliency)


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
            *(["stored_size", "stored_width"] if result.stored else []),
            "ceiling_miou_nearest", "ceiling_miou_majority"]
    cols += ["erf_radius50", "erf_radius90"] if args.erf else []
    heads = [c.replace("ceiling_miou_", "ceiling_").replace("stored_", "stored ") for c in cols]
    print(_table([[_fmt(r.get(c)) for c in cols] for r in result.rows()], heads))
    print(f"\n{_count(len(result.points), 'point')} of {cache.path} "
          f"({_count(result.num_images, 'label map')}) -> "
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
    tag = f"cka-{args.kind}-{args.spatial}" + ("-debiased" if args.estimator == "debiased"
                                               else "")
    if cache2 is not None:
        tag += f"-vs-{Path(str(cache2.path).removesuffix('.partial')).stem}"
    stem = output_stem(cache.path, tag, args.out)
    check_writable(stem, force=args.force)
    used = {"bandwidth": args.kind == "rbf", "batch_size": args.kind == "minibatch",
            "positions": args.spatial == "pixels"}
    unused = [f"--{k.replace('_', '-')}" for k, ok in used.items()
              if getattr(args, k) is not None and not ok]
    if unused:
        warnings.warn(f"{', '.join(unused)} must go with the kind or spatial policy that uses "
                      f"it (--bandwidth: rbf, --batch-size: minibatch, --positions: pixels); "
                      f"ignored with --kind {args.kind} --spatial {args.spatial}.",
                      FeatlabWarning, stacklevel=2)
    given = {k: getattr(args, k) for k in used if getattr(args, k) is not None}
    result = cka_matrix(cache, cache2, args.kind, points=args.points, points2=args.points2,
                        spatial=args.spatial, estimator=args.estimator, seed=args.seed,
                        device=args.device, progress=not args.quiet,
                        max_bytes=args.max_bytes, **given)
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


def cmd_probe(args: argparse.Namespace) -> int:
    """Linear probe per skip point: fit on --train, score on --val, write CSV + JSON."""

    from featlab.analysis._io import check_writable, output_stem
    from featlab.analysis.probe import probe_points, write_result
    from featlab.errors import ConfigError

    out = output_stem(args.train, "probe", args.out)
    check_writable(out, force=args.force)
    if (args.random_train is None) != (args.random_val is None):
        raise ConfigError("--random-train and --random-val must be given together; got one. "
                          "Fix: pass both random-backbone caches (train and val splits).")
    random = None if args.random_train is None else (args.random_train, args.random_val)
    result = probe_points(args.train, args.val, args.points, alpha=args.alpha,
                          class_weight=args.class_weight,
                          max_pixels=None if args.max_pixels == 0 else args.max_pixels,
                          standardize=not args.no_standardize, null=args.null,
                          random_caches=random, seed=args.seed, device=args.device,
                          batch_size=args.batch_size, progress=not args.quiet)
    paths = write_result(result, out, force=args.force)
    if args.json:
        _print_json(result.to_dict())
        return 0
    cols = ["point", "stride", "channels", "pixel_accuracy", "mean_accuracy", "miou", "alpha"]
    cols += ["null_miou"] if args.null else []
    cols += ["random_miou"] if random else []
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else v  # noqa: E731
    print(_table([[fmt(r[c]) for c in cols] for r in result.rows()], cols))
    print(f"\nlinear probes of {_count(len(result.rows()), 'point')} -> {paths[0]}, {paths[1]}")
    return 0


def cmd_saliency(args: argparse.Namespace) -> int:
    """Saliency maps per skip point on a data set: a PNG grid and a pointing-game summary."""
    from pathlib import Path

    from featlab.analysis.saliency_summary import (plot_saliency_grid, saliency_examples,
                                                   saliency_summary, write_summary)
    from featlab.data import load_dataset
    from featlab.distributed import default_device
    from featlab.errors import ConfigError
    from featlab.models import get_backbone

    out = Path(args.out)
    grid = out / f"saliency_{args.method}.png"
    there = [str(p) for p in (grid, out / "saliency.json", out / "saliency.csv") if p.exists()]
    if there and not args.force:
        raise ConfigError(f"saliency results must not overwrite existing files; "
                          f"{', '.join(there)} exist. Fix: pass --force or another --out.")
    model, spec = get_backbone(args.model, weights=args.weights)
    ds = load_dataset(args.data, split=args.split, root=args.root, size=spec.input_size
                      if args.size is None else args.size)
    kwargs = dict(method=args.method, spec=spec, relu=not args.no_relu, seed=args.seed,
                  device=args.device or default_device())  # as every command: the GPU if any
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
