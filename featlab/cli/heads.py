"""Commands that train segmentation heads: train-head, sweep."""

from __future__ import annotations

import argparse
import logging
import os

from featlab.cli._output import _count, _is_main, _print_json, _table

log = logging.getLogger("featlab")


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add this module's sub-commands to the ``featlab`` parser."""
    p = sub.add_parser("train-head", parents=[common],
                       help="train a segmentation head (baseline or one skip) from two caches")
    _add_head_options(p)
    p.add_argument("--skip", help="skip point, e.g. layer2.1 (omit for the baseline)")
    p.add_argument("--seed", type=int, default=0, help="head init and shuffling seed")
    p.add_argument("--out", help="run folder (default TRAIN_DIR/heads/RUN_NAME)")
    p.set_defaults(func=cmd_train_head)

    p = sub.add_parser("sweep", parents=[common],
                       help="baseline vs a single skip per point over seeds; what predicts gain")
    _add_head_options(p)
    p.add_argument("--points", default="stages",
                   help="skip points: stages | all | glob | re:REGEX | comma-separated names")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds 0..N-1 (default 3)")
    p.add_argument("--seed-list", type=int, nargs="+", help="explicit seeds instead of --seeds")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of images")
    p.add_argument("--no-properties", action="store_true",
                   help="skip the property join (probe, ceiling, CKA) and the correlations")
    p.add_argument("--out", help="sweep folder (default TRAIN_DIR/sweep)")
    p.set_defaults(func=cmd_sweep)


def _head_overrides(args: argparse.Namespace) -> dict:
    from featlab.segment.train import FLAG_FIELDS

    out = {}
    for key in FLAG_FIELDS:
        value = getattr(args, key, None)
        if value is not None and value is not False:  # given (a store_true flag: True)
            out[key] = value
    if out.get("deterministic"):  # before this process's first CUDA matrix product
        from featlab.runinfo import CUBLAS_WORKSPACE_CONFIG

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    return out


def cmd_train_head(args: argparse.Namespace) -> int:
    """Train a baseline or single-skip segmentation head from two caches."""
    from featlab.segment.train import HeadSettings, train_head

    settings = HeadSettings(skip=args.skip, seed=args.seed, **_head_overrides(args))
    # the same command again on a finished run prints its result, as sweep and demo do
    result = train_head(args.train, args.val, settings, out=args.out, device=args.device,
                        progress=not args.quiet, force=args.force, reuse=True,
                        preload=not args.no_preload)
    if not _is_main():
        return 0
    if args.json:
        _print_json(result.to_dict())
        return 0
    print(_table([[h["epoch"], f"{h['loss']:.4f}", f"{h['val_miou']:.4f}",
                   f"{h['val_pixel_accuracy']:.4f}", h["seconds"]] for h in result.history],
                 ["epoch", "loss", "val mIoU", "val pixel acc", "train s (total)"]))
    skip = result.settings["skip"]  # the point's name, also when an alias was given
    kind = f"skip {skip} ({settings.fusion})" if skip else "baseline"
    kind += ", backbone fine-tuned" if settings.finetune else ""
    resumed = (f"resumed after epoch {result.resumed_from_epoch}, "
               if result.resumed_from_epoch else "")
    print(f"\n{kind}: val mIoU {result.miou:.4f}, pixel accuracy {result.pixel_accuracy:.4f}, "
          f"mean accuracy {result.mean_accuracy:.4f} ({result.train_images_per_second:.0f} "
          f"train images/s over all epochs; {resumed}{result.seconds:.0f} s in this process, "
          f"{_count(result.world_size, 'process', 'processes')}) -> {result.folder}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Baseline vs one single-skip head per point, over seeds; which properties predict gain."""
    from pathlib import Path

    from featlab.distributed import from_main, init, resolve_device
    from featlab.errors import ConfigError
    from featlab.runinfo import run_versions
    from featlab.segment import runs
    from featlab.report.tables import predictors, property_table
    from featlab.segment.sweep import read_sweep, sweep, sweep_difference, write_sweep
    from featlab.segment.train import HeadSettings

    out = Path(args.out) if args.out else Path(args.train).resolve().parent / "sweep"
    seeds = args.seed_list if args.seed_list else args.seeds
    settings = HeadSettings(**_head_overrides(args))
    init(device=resolve_device(args.device))  # under torchrun: rank 0 decides for every node
    if from_main(lambda: (out / "sweep.json").exists()) and not args.force:
        record = from_main(lambda: read_sweep(out))

        def difference(extends: bool):
            return sweep_difference(record, args.train, args.val, args.points, seeds, settings,
                                    bootstrap=args.bootstrap, extends=extends)

        if difference(extends=False) is None:
            if not _is_main():
                return 0
            log.info("%s holds this sweep, finished: printing its results", out)
            return show_sweep(out, args.json)
        diff = difference(extends=True)
        if diff is not None:
            what, there, now = diff
            raise ConfigError(f"{what} differs from the finished sweep in {out}: {there} "
                              f"there, {now} now; a finished sweep is not replaced. Fix: pass "
                              "--force to train every run again, or choose another --out.")
        log.info("extending the finished sweep in %s (seeds %s, %d points): its runs are reused",
                 out, list(record.seeds), len(record.points))
    result = sweep(args.train, args.val, args.points, seeds, settings, out=out,
                   device=args.device, progress=not args.quiet, force=args.force,
                   bootstrap=args.bootstrap, preload=not args.no_preload)
    if not _is_main():  # under torchrun: rank 0 writes, measures the properties and prints
        return 0
    paths = write_sweep(result, out)
    preds, notes = [], []
    if not args.no_properties:
        how: dict = {}
        props = property_table(args.train, args.val, list(result.points), notes=notes,
                               provenance=how)
        preds = predictors(result, props)
        runs.write_json(out / "predictors.json", {
            "properties": props, "predictors": preds, "notes": notes, "provenance": how,
            "versions": run_versions()})
        paths.append(out / "predictors.json")
    elif (out / "predictors.json").exists():  # it belonged to the sweep just replaced
        (out / "predictors.json").unlink()
        log.info("removed %s: it measured the sweep this one replaced", out / "predictors.json")
    if args.json:
        _print_json({"sweep": result.to_dict(), "rows": result.rows(), "predictors": preds,
                     "notes": notes})
        return 0
    print_sweep(result, preds, notes, paths)
    return 0


def show_sweep(folder, as_json: bool = False) -> int:
    """Print a finished sweep again from what it wrote in ``folder`` (``sweep.json``, and
    ``predictors.json`` when the properties were joined), as ``featlab sweep`` printed it."""
    import json
    from pathlib import Path

    from featlab.segment.sweep import read_sweep

    folder = Path(folder)
    result = read_sweep(folder)
    paths = [folder / "sweep.json", folder / "sweep.csv"]
    preds, notes = [], []
    if (folder / "predictors.json").exists():
        found = json.loads((folder / "predictors.json").read_text())
        preds, notes = found.get("predictors") or [], found.get("notes") or []
        paths.append(folder / "predictors.json")
    if as_json:
        _print_json({"sweep": result.to_dict(), "rows": result.rows(), "predictors": preds,
                     "notes": notes})
    else:
        print_sweep(result, preds, notes, paths)
    return 0


def print_sweep(result, preds: list[dict], notes: list[str], paths: list) -> None:
    """The tables ``featlab sweep`` prints: per point the gain and its intervals, then each
    property's Spearman correlation with the gain (also what ``featlab demo`` shows again)."""

    def ci(pair):
        return "-" if not pair or pair[0] is None else f"[{pair[0]:+.4f}, {pair[1]:+.4f}]"

    rows = [[r["point"], r["stride"], f"{r['miou_mean']:.4f}",
             "-" if r["miou_std"] is None else f"{r['miou_std']:.4f}",
             " ".join(f"{v:.4f}" for v in r["per_seed"]), f"{r['gain']:+.4f}",
             ci(r["gain_ci"]), ci(r["gain_ci_all_points"]),
             {True: "yes", False: "no", None: "-"}[r["beats_2std"]], r["rank"],
             "-" if r["p_best"] is None else f"{r['p_best']:.2f}"]
            for r in result.rows()]
    print(_table(rows, ["point", "stride", "mIoU", "std", "per seed", "gain", "CI",
                        f"CI, all {len(result.points)} at once", "> 2 std", "rank", "P(best)"]))
    m = len(result.points)
    print(f"CI: {result.confidence:.0%} interval of the gain over seeds and val images together "
          f"(sweep.csv: each alone too)\nCI, all {m} at once: every interval holds together "
          f"(Bonferroni over the {m} points); > 2 std: descriptive, not a test\nP(best): share "
          f"of the resamples of images and seeds in which the point gains most")
    if preds:
        print("\nSpearman correlation of each property with the gain across points:")
        print(_table([[p["property"], p["spearman_rho"], p["p_value"], p.get("p_method"),
                       p.get("p_holm"), p["n_points"], p.get("undefined", "")] for p in preds],
                     ["property", "rho", "p", "p method", "p, Holm", "points", ""]))
        print(f"p, Holm: adjusted for testing the {sum(p['p_value'] is not None for p in preds)} "
              "properties together (they share one family-wise error rate)")
    for note in notes:
        print(f"note: {note}")
    print(f"\n{_count(len(result.points) + 1, 'configuration')} x "
          f"{_count(len(result.seeds), 'seed')}, trained or reused in {result.seconds:.1f} s "
          f"(the properties not counted) -> {', '.join(str(p) for p in paths)}")


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
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms: runs on a GPU repeat bit for bit (slower)")
    p.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda:LOCAL_RANK when available)")
    p.add_argument("--no-preload", action="store_true",
                   help="read features per batch instead of loading them into memory")
    p.add_argument("--force", action="store_true", help="replace existing runs")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
