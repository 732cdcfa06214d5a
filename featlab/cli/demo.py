"""``featlab demo``: the whole study on the embedded data set, one command after another.

Each step prints the ``featlab`` command it runs, so the demo doubles as a tour of the CLI:
pretrain a backbone on ``shapes`` (cached), list its skip points and capture them, extract
train/val caches of the ``stages`` points, and run the single-skip sweep with the property join
(resolution ceiling, CKA to the last point, probe mIoU). Every step reuses what an earlier run
left in ``--out`` when it was made with exactly this run's settings (a cache: the settings
``featlab extract`` records, compared as ``featlab extract`` compares them before resuming; the
sweep: the head settings, seeds, points and caches in ``sweep.json``): a second ``make demo``
only prints. Something made with other settings is never overwritten without ``--force``; the
demo stops with a one-line error naming the first setting that differs.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import NoReturn

from featlab.cli._output import _table

# `featlab extract` flags (as ExtractSettings.difference names them) -> the demo's options
_DEMO_FLAGS = {"`--input-size`": "the input size (`--size`)", "`--model`": "`--model`",
               "`--weights`": "the backbone's weights key (`--model`, `--pretrain-steps`)",
               "the model's weights (sha256 of its state_dict)":
                   "the hash of the backbone's state_dict (its weights)"}
_SAMPLE_FLAGS = ("`--limit`", "the number of samples")


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add ``featlab demo`` to the ``featlab`` parser."""
    p = sub.add_parser("demo", parents=[common],
                       help="the whole study on shapes: pretrain, skip points, caches, sweep")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--input-size", "--size", dest="size", type=int, default=128,
                   help="input side in pixels (default 128)")
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
    p.add_argument("--force", action="store_true",
                   help="replace the caches and the sweep in --out that were made with other "
                        "settings (extract / sweep --force); what matches is still reused")
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


def _parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` as the ``featlab`` command it names would see it (its defaults filled in)."""
    from featlab.cli import build_parser

    return build_parser().parse_args(argv)


def _recorded(path: Path):
    """``(settings, complete)`` of the cache at ``path`` (or of its ``.partial`` file), None
    when there is neither."""
    from featlab.cache.reader import open_cache
    from featlab.cache.settings import ExtractSettings
    from featlab.errors import ConfigError, FeatlabError

    if not (path.exists() or path.with_name(path.name + ".partial").exists()):
        return None
    try:
        with open_cache(path, allow_partial=True) as cache:
            return ExtractSettings.from_dict(cache.settings), cache.complete
    except FeatlabError as err:
        why = " ".join(str(err).split(" Fix:")[0].split())
        raise ConfigError(f"the cache {path} must be one the demo can read to reuse it; {why} "
                          f"Fix: choose another --out, or pass --force to extract it again (or "
                          f"delete {path}).") from err


def _refuse(label: str, there: str, now: str, where: str, fix: str) -> NoReturn:
    from featlab.errors import ConfigError

    raise ConfigError(f"{label} differs from {where}: {there} there, {now} now; the demo reuses "
                      f"only what was made with its settings. Fix: choose another --out, {fix}")


def _cache_refusal(diff: tuple[str, str, str], path: Path, split: str) -> NoReturn:
    flag, there, now = diff
    label = (f"the number of samples (`--{split}-samples`)" if flag in _SAMPLE_FLAGS
             else _DEMO_FLAGS.get(flag, flag))
    _refuse(label, there, now, f"the cache {path}", f"or pass --force to extract it again "
            f"(or delete {path}).")


def _check_backbone(paths: dict[str, Path], model: str, weights: str) -> None:
    """Before any pretraining: refuse caches in --out made from another backbone or weights."""
    import dataclasses

    for split, path in paths.items():
        found = _recorded(path)
        if found is not None:
            then = found[0]
            now = dataclasses.replace(then, model={**then.model, "name": model,
                                                   "weights": weights})
            diff = then.difference(now)
            if diff is not None:
                _cache_refusal(diff, path, split)


def _extract_settings(argv: list[str], model, spec):
    """The settings ``featlab <argv>`` (an extract) records in its cache, resolved as
    ``featlab extract`` resolves them (nothing is computed or written)."""
    from featlab.cache.setup import prepare_job
    from featlab.data import load_dataset

    a = _parse(argv)
    ds = load_dataset(a.data, split=a.split, root=a.root, size=a.input_size, seed=a.data_seed)
    return prepare_job(model, ds, a.points, a.out, spec=spec, dtype=a.dtype,
                       error_stat=a.error_stat, max_size=a.max_size, limit=a.limit,
                       max_channels=a.max_channels, channel_seed=a.channel_seed,
                       save_images=a.save_images, probe=False).settings


def _cache_step(path: Path, split: str, now, force: bool) -> str:
    """``"reuse"`` (complete, same settings), ``"extract"`` (none, or a partial one with the same
    settings: resumed) or ``"replace"`` (other settings, ``--force``); else a one-line error."""
    from featlab.errors import FeatlabError

    try:
        found = _recorded(path)
    except FeatlabError:  # not a cache this featlab can read: replaced only when asked to
        if force:
            return "replace"
        raise
    if found is None:
        return "extract"
    then, complete = found
    diff = then.difference(now)
    if diff is None:
        return "reuse" if complete else "extract"
    if force:
        return "replace"
    _cache_refusal(diff, path, split)


def _sweep_step(folder: Path, argv: list[str], force: bool, replaced: bool) -> str:
    """``"reuse"`` (a finished sweep with this run's settings and caches), ``"run"`` (none yet:
    finished runs in it are reused) or ``"replace"`` (``--force``: other settings, or caches
    extracted again); else a one-line error."""
    from featlab.cli.heads import _head_overrides
    from featlab.errors import ConfigError
    from featlab.segment.sweep import read_sweep, sweep_difference
    from featlab.segment.train import HeadSettings

    if force and replaced:  # its runs were trained on the caches replaced now
        return "replace"
    if not (folder / "sweep.json").exists():
        return "run"
    a = _parse(argv)
    try:
        diff = sweep_difference(read_sweep(folder), a.train, a.val, a.points,
                                a.seed_list or a.seeds, HeadSettings(**_head_overrides(a)),
                                bootstrap=a.bootstrap)
    except ConfigError as err:  # an unreadable record
        diff = ("the sweep record", "unreadable", f"a finished sweep ({err})")
    if diff is None:
        return "reuse"
    if force:
        return "replace"
    _refuse(*diff, f"the sweep {folder}", f"or pass --force to run the sweep again (or delete "
            f"{folder}).")


def cmd_demo(args: argparse.Namespace) -> int:
    """Pretrain -> skip points -> capture -> caches -> sweep with the property join."""
    import dataclasses

    import torch

    import featlab
    from featlab.cli.heads import show_sweep
    from featlab.models import _entry
    from featlab.pretrain import PretrainSettings, pretrain, settings_key

    steps = 4 if args.no_sweep else 5
    out = Path(args.out)
    samples = {"train": args.train_samples, "val": args.val_samples}
    paths = {split: out / f"{split}.h5" for split in samples}
    overrides = {} if args.pretrain_steps is None else {"steps": args.pretrain_steps}
    recipe = dataclasses.replace(PretrainSettings(), **overrides)
    _entry(args.model)  # an unknown name: that error (with suggestions), not a difference
    if not args.force:  # refused before a backbone is trained for nothing
        _check_backbone(paths, args.model, f"shapes:{settings_key(args.model, recipe)}")
    result = pretrain(args.model, data="shapes", settings=recipe, progress=not args.quiet)
    weights = f"shapes:{result.key}"  # exactly the checkpoint trained or reused here
    print(f"[1/{steps}] {args.model} trained on shapes: val accuracy {result.accuracy:.3f} "
          f"(chance {result.chance:.3f}) -> {result.checkpoint}"
          + (" (reused)" if result.reused else f" ({result.seconds:.0f} s)"))

    model, spec = featlab.get_backbone(args.model, weights=weights)
    extracts = {split: ["extract", "--model", args.model, "--weights", weights, "--data",
                        "shapes", "--split", split, "--points", "stages", "--input-size",
                        str(args.size), "--limit", str(n), "--out", str(paths[split])]
                for split, n in samples.items()}
    todo = {split: _cache_step(paths[split], split, _extract_settings(argv, model, spec),
                               args.force)
            for split, argv in extracts.items()}  # every cache checked before any is written

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

    print(f"[4/{steps}] activation caches of the stages points:")
    for split, argv in extracts.items():
        if todo[split] == "reuse":
            print(f"$ featlab inspect {paths[split]}   # already extracted")
            continue
        _run(argv + (["--force"] if todo[split] == "replace" else []), args.quiet)
    if args.no_sweep:
        return 0

    sweep_dir = out / "sweep"
    print(f"[5/{steps}] which single skip helps, and which property predicts it:")
    sweep = ["sweep", "--train", str(paths["train"]), "--val", str(paths["val"]), "--points",
             "stages", "--seeds", str(args.seeds), "--epochs", str(args.epochs), "--fusion",
             args.fusion, "--out", str(sweep_dir)]
    replaced = any(step == "replace" for step in todo.values())
    what = _sweep_step(sweep_dir, sweep, args.force, replaced)
    if what == "reuse":
        print(f"$ {shlex.join(['featlab', *sweep])}   # already done with these settings:")
        show_sweep(sweep_dir)
        return 0
    _run(sweep + (["--force"] if what == "replace" else []), args.quiet)
    return 0
