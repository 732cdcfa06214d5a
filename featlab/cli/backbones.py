"""Commands about backbones, data sets and skip points: models, datasets, points, pretrain."""

from __future__ import annotations

import argparse

from featlab.cli._output import _print_json, _table


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this module's sub-commands to the ``featlab`` parser."""
    p = sub.add_parser("models", parents=[common], help="list the backbones and local weights")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("datasets", parents=[common], help="list the data sets and their layouts")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("points", parents=[common], help="list the skip points of a backbone")
    p.add_argument("model", help="backbone name, see `featlab models`")
    p.add_argument("--weights", default="none",
                   help="none | imagenet | shapes | PATH (default none)")
    p.add_argument("--input-size", type=int,
                   help="input side in pixels (default: the weights' own, 224 for none)")
    p.add_argument("--select", default="all",
                   help="all | stages | glob (layer3.*) | re:REGEX | comma-separated names")
    p.add_argument("--modules", action="store_true",
                   help="every module of a forward instead: type, calls, output shape, and "
                        "whether a later in-place op changes its output (R-1.4)")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list of SkipPoint (or --modules: ModuleCall) records")
    p.set_defaults(func=cmd_points)

    p = sub.add_parser("pretrain", parents=[common],
                       help="train a backbone as a classifier on the embedded data set (cached)")
    p.add_argument("--model", default="resnet18", help="backbone name, see `featlab models`")
    p.add_argument("--data", default="shapes", choices=["shapes"], help="the embedded data set")
    p.add_argument("--steps", type=int, help="optimizer steps (default 600)")
    p.add_argument("--batch-size", type=int, help="images per step (default 32)")
    p.add_argument("--image-size", type=int, help="training image side in pixels (default 48)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--seed", type=int, help="seed of the init and the images (default 0)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when available)")
    p.add_argument("--threads", type=int,
                   help="torch threads on the CPU; the weights depend on it (default: torch's "
                        "setting, capped so that threads + the rendering worker fit the cores)")
    p.add_argument("--force", action="store_true", help="train again even if a checkpoint exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_pretrain)


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

    model, spec = get_backbone(args.model, weights=args.weights)
    size = spec.input_size if args.input_size is None else args.input_size
    if args.modules:
        return _print_modules(model, args.model, size, args.json)
    points = skip_points(model, input_size=size, select=args.select)
    if args.json:
        _print_json([{**p.to_dict(), "rf_status": p.rf_status} for p in points])
        return 0
    rows = [
        [p.index, p.name, p.channels, f"{p.size[0]}x{p.size[1]}", p.stride,
         p.rf_size, p.rf_stride, p.rf_padding, p.rf_status]
        for p in points
    ]
    print(_table(rows, ["#", "name", "C", "HxW", "stride", "rf", "rf_stride", "rf_pad",
                        "rf status"]))
    print(f"\n{len(points)} skip points of {args.model} at input {size} px "
          f"(selection {args.select!r}).")
    return 0


def _print_modules(model, name: str, size: int, as_json: bool) -> int:
    from featlab.hooked import module_calls

    calls = module_calls(model, size)
    if as_json:
        _print_json([c.to_dict() for c in calls])
        return 0
    print(_table([[i, c.name, c.type, c.calls, "-" if c.shape is None else
                   "x".join(map(str, c.shape[1:])), "yes" if c.changed_in_place else ""]
                  for i, c in enumerate(calls)],
                 ["#", "module", "type", "calls", "output", "changed in place after"]))
    reused = sum(c.calls > 1 for c in calls)
    changed = sum(c.changed_in_place for c in calls)
    print(f"\n{len(calls)} modules of {name} ran at input {size} px; {reused} more than once "
          f"(capture them with on_reuse='all'), {changed} with an output a later in-place op "
          "changes (featlab's hooks copy it before that).")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from featlab.pretrain import PretrainSettings, pretrain

    overrides = {
        k: v for k, v in vars(args).items()
        if k in PretrainSettings.__dataclass_fields__ and v is not None
    }
    settings = PretrainSettings(**overrides)
    result = pretrain(args.model, data=args.data, settings=settings, device=args.device,
                      progress=not args.quiet, force=args.force, threads=args.threads)
    if args.json:
        _print_json(result.to_dict())
        return 0
    how = (f"reused (trained in {result.seconds:.0f} s)" if result.reused
           else f"trained in {result.seconds:.0f} s")
    default = settings == PretrainSettings()
    print(
        f"{args.model} on {args.data}, {how}: val accuracy {result.accuracy:.3f} "
        f"(chance {result.chance:.3f}, majority prior {result.prior:.3f}) -> {result.checkpoint}"
        f"\nuse them with --weights shapes:{result.key}"
        + (" (or --weights shapes: these are the default settings)" if default else "")
    )
    return 0
