"""Train and evaluate a segmentation head (baseline or single skip) — ``featlab train-head``.

By default the backbone is frozen and the head trains from two activation caches (train and
val; no backbone compute). ``finetune=True`` runs the backbone on the images (rebuilt from the
caches' records) and trains it too. Training is cross-entropy (ignore 255) with AdamW or SGD
and a poly learning rate, seeded and deterministic on the CPU (the shuffling order is a function
of ``(seed, epoch)``, the head's initial weights of ``seed``), with a checkpoint after every
epoch that a killed run resumes from (the resumed run ends equal to an uninterrupted one).
Metrics come from one data-set-level confusion matrix at the label's native resolution (logits
upsampled bilinearly, labels never resized). Under ``torchrun`` the head is wrapped in
``DistributedDataParallel``, each rank trains on its ``DistributedSampler`` share of every
global batch, and the validation confusion matrix is summed over ranks.

Examples:
    >>> r = train_head("train.h5", "val.h5", skip="layer2.1", epochs=4)  # doctest: +SKIP
    >>> r.miou, r.folder  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from featlab import distributed as fdist
from featlab._records import check_record, with_overrides
from featlab.errors import CheckpointError, ConfigError, did_you_mean
from featlab.segment import runs
from featlab.segment.heads import FUSIONS, FrozenBackbone, SegHead, finetune_features
from featlab.segment.metrics import ConfusionMatrix, miou_per_image_mean
from featlab.segment.sources import CacheSource, ImageSource, Preloads, check_caches

log = logging.getLogger("featlab")

__all__ = ["HeadSettings", "HeadResult", "train_head", "fit", "evaluate", "run_name"]

OPTIMIZERS = ("adamw", "sgd")
# the HeadSettings fields that `featlab train-head` and `featlab sweep` set by a flag of the
# same name (`weight_decay` by `--weight-decay`)
FLAG_FIELDS = ("fusion", "epochs", "batch_size", "lr", "optimizer", "weight_decay",
               "mid_channels", "finetune", "deterministic")


@dataclass(frozen=True)
class HeadSettings:
    """Everything that determines a trained head (a resumed run must have the same).

    Attributes:
        skip: the skip point's name (None: the baseline, last point only).
        fusion: ``"sum"`` or ``"concat"`` (see :mod:`featlab.segment.heads`).
        epochs, batch_size: the schedule (``batch_size`` is global: split over ranks).
        lr: peak learning rate (poly decay to zero over all steps).
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9, Nesterov off).
        weight_decay: on conv weights only.
        poly_power: exponent of the poly schedule ``(1 - step / steps) ** power``.
        mid_channels: width of the ``concat`` fusion's 3x3 conv.
        finetune: train the backbone too (runs it on images); else train from caches.
        backbone_lr: learning-rate multiplier of the backbone when fine-tuning.
        seed: seeds the head's initialisation and the shuffling order.
        deterministic: run with ``torch.use_deterministic_algorithms`` (and cuDNN's
            deterministic kernels), so that two runs on a GPU end bit for bit equal, as they
            do on the CPU anyway. The logits are then upsampled and the loss taken by
            formulations with deterministic gradients (bilinear weights as two matrix
            products; cross-entropy by ``gather``), on every device; slower on a GPU.
    """

    skip: str | None = None
    fusion: str = "sum"
    epochs: int = 8
    batch_size: int = 16
    lr: float = 3e-3
    optimizer: str = "adamw"
    weight_decay: float = 1e-4
    momentum: float = 0.9
    poly_power: float = 0.9
    mid_channels: int = 64
    finetune: bool = False
    backbone_lr: float = 0.1
    seed: int = 0
    deterministic: bool = False

    def __post_init__(self):
        bad = [f"{n}={getattr(self, n)!r}" for n in ("epochs", "batch_size", "mid_channels")
               if not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        finite = all(math.isfinite(v) for v in (self.lr, self.weight_decay, self.poly_power,
                                                 self.backbone_lr))
        if not (finite and self.lr > 0 and self.weight_decay >= 0 and self.poly_power >= 0
                and 0 <= self.momentum < 1 and self.backbone_lr >= 0):
            bad.append(f"lr={self.lr}, weight_decay={self.weight_decay}, poly_power="
                       f"{self.poly_power}, momentum={self.momentum}, backbone_lr="
                       f"{self.backbone_lr}")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad.append(f"seed={self.seed!r}")
        if bad:
            raise ConfigError(f"HeadSettings need positive epochs, batch_size and mid_channels, "
                              f"a finite lr > 0, weight_decay >= 0, 0 <= momentum < 1 and seed "
                              f">= 0; got "
                              f"{'; '.join(bad)}. Fix: correct those values.")
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion must be one of {', '.join(FUSIONS)}; got "
                              f"{self.fusion!r}.{did_you_mean(str(self.fusion), FUSIONS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got "
                              f"{self.optimizer!r}.{did_you_mean(str(self.optimizer), OPTIMIZERS)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> HeadSettings:
        check_record(cls, d)
        return cls(**d)


@dataclass(frozen=True)
class HeadResult:
    """One trained head: final val metrics, per-epoch history and what produced it.

    ``miou`` is the data-set-level mIoU (``metrics["miou_dataset"]``) after the last epoch;
    ``history`` has one dict per epoch (epoch, loss, lr, val_miou, val_pixel_accuracy, seconds).
    """

    folder: str
    settings: dict
    miou: float
    pixel_accuracy: float
    mean_accuracy: float
    metrics: dict
    history: tuple
    epochs_done: int
    seconds: float
    train_images_per_second: float
    device: str
    world_size: int
    seed: int
    train: dict
    val: dict
    versions: dict
    git: str | None = None
    resumed_from_epoch: int = 0
    finished: bool = True


    def __repr__(self) -> str:  # one line: the whole record is to_dict()
        return (f"HeadResult({run_name(HeadSettings.from_dict(self.settings))}: val mIoU "
                f"{self.miou:.4f}, pixel accuracy {self.pixel_accuracy:.4f}, "
                f"{self.epochs_done} epoch{'s' * (self.epochs_done != 1)}, "
                f"folder={self.folder!r})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["history"] = [dict(h) for h in self.history]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> HeadResult:
        check_record(cls, d)
        return cls(**{**d, "history": tuple(d.get("history", ()))})

    def rows(self) -> list[dict]:
        """One dict per epoch (the log)."""
        return [dict(h) for h in self.history]


def run_name(settings: HeadSettings) -> str:
    """Folder name of a run: ``baseline-seed0`` or ``skip-layer2.1-sum-seed0``."""
    kind = "baseline" if settings.skip is None else f"skip-{settings.skip}-{settings.fusion}"
    return f"{kind}{'-ft' if settings.finetune else ''}-seed{settings.seed}"


class _Joint(nn.Module):
    """Head plus (optionally) the backbone: the module DDP wraps."""

    def __init__(self, head: SegHead, backbone: nn.Module | None = None, finetune: bool = False):
        super().__init__()
        self.head, self.backbone, self.finetune = head, backbone, finetune

    def forward(self, inputs, size) -> torch.Tensor:
        if self.backbone is None:
            feats = inputs
        elif self.finetune:
            feats = finetune_features(self.backbone, self.head.points, inputs)
        else:
            feats = self.backbone(inputs)
        return self.head(feats, size)


def _open(cache):
    from featlab.cache.reader import CacheReader, open_cache

    return cache if isinstance(cache, CacheReader) else open_cache(cache, allow_partial=False)


def train_head(train, val, settings: HeadSettings | None = None, *, out=None, device=None,
               progress: bool = True, force: bool = False, reuse: bool = False,
               preload: bool | Preloads = True, **overrides) -> HeadResult:
    """Train a baseline or single-skip head on a train cache, validate on a val cache.

    Args:
        train, val: caches (paths or readers) of one backbone on two splits.
        settings: a :class:`HeadSettings`; ``overrides`` replace single fields
            (``train_head(a, b, skip="layer2.1", epochs=4)``).
        out: run folder (default ``<train cache folder>/heads/<run_name>``).
        device: default CUDA (``cuda:LOCAL_RANK``) when available, else CPU.
        progress: tqdm bars (off on ranks other than 0 and with ``FEATLAB_PROGRESS=0``).
        force: delete an existing run (finished or not) and start over.
        reuse: return a finished run's result instead of refusing (the sweep's resume).
        preload: read the needed points into memory once (else per batch from the file); a
            :class:`~featlab.segment.sources.Preloads` keeps what it reads for later runs (a
            sweep's), and takes what earlier runs read from it.

    Returns:
        The :class:`HeadResult` (also in ``<out>/run.json``).

    Raises:
        ConfigError: a finished run exists at ``out`` (without force/reuse), bad settings.
        CheckpointError: a checkpoint at ``out`` was made with other settings or caches.
        CacheError: the caches do not match each other (R-8.3).
    """
    settings = with_overrides(settings or HeadSettings(), overrides, "train_head")
    train, val = _open(train), _open(val)
    last = train.point_names[-1]
    if settings.skip is not None:  # PointNotInCacheError with suggestions; an alias -> its name
        settings = dataclasses.replace(settings, skip=train.point(settings.skip).name)
    if settings.skip == last:
        raise ConfigError(f"--skip must name a point before the last one ({last!r}); got "
                          f"{settings.skip!r}. Fix: omit --skip for the baseline.")
    points = [last] + ([settings.skip] if settings.skip else [])
    check_caches(train, val, points)
    folder = Path(out) if out is not None else train.path.parent / "heads" / run_name(settings)
    dev = fdist.resolve_device(device)
    info = fdist.init(device=dev)
    runs.check_folder(folder)  # before any training: not when the first checkpoint is due
    identity = (train.identity(), val.identity())
    done = _existing(folder, settings, identity, force, reuse, info)
    if done is not None:
        return done
    head = _make_head(train, points, settings)
    backbone = None
    with contextlib.ExitStack() as scope:
        if settings.finetune:
            backbone, spec = _backbone(train)
            backbone = backbone.to(dev)
            train_src = ImageSource(_dataset(train), train.index, backbone, spec, points, True)
            val_src = ImageSource(_dataset(val), val.index, backbone, spec, points, True)
        else:
            store = preload if isinstance(preload, Preloads) else Preloads() if preload else None
            if store is not None:  # one run: both sources' arrays are held together
                scope.enter_context(store.run())
            train_src, val_src = (CacheSource(c, points, store) for c in (train, val))
        head.set_input_stats(train_src.stats())
        return fit(head, train_src, val_src, settings, folder, device=dev, progress=progress,
                   backbone=backbone, classes=train.classes, ignore_index=train.ignore_index,
                   identity=identity, info=info)


def _make_head(cache, points, settings: HeadSettings) -> SegHead:
    last = cache.point(points[0])
    skip = cache.point(points[1]) if len(points) > 1 else None
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG is untouched
        torch.manual_seed(settings.seed)
        return SegHead(last.name, last.channels, len(cache.classes),
                       skip=skip.name if skip else None, skip_channels=skip.channels if skip
                       else None, fusion=settings.fusion, mid_channels=settings.mid_channels)


def _backbone(cache):
    from featlab.models import get_backbone

    m = cache.model or {}
    return get_backbone(m["name"], weights=m["weights"], seed=m.get("seed", 0) or 0)


def _dataset(cache):
    from featlab.data import load_dataset

    d = dict(cache.data or {})
    name, split = d.pop("name"), d.pop("split")
    return load_dataset(name, split, root=d.pop("root", None), size=d.pop("size", None),
                        seed=d.pop("seed", 0), **d)


def _existing(folder: Path, settings: HeadSettings, identity: tuple[dict, dict], force: bool,
              reuse: bool, info) -> HeadResult | None:
    record = fdist.from_main(lambda: runs.read_run(folder))  # every rank decides alike
    if force:
        if info.is_main:
            for name in runs.RUN_FILES:
                (folder / name).unlink(missing_ok=True)
        fdist.barrier()
        return None
    fdist.from_main(lambda: runs.refuse_foreign(folder, runs.RUN_FILES,
                                                (runs.RUN_JSON, runs.CHECKPOINT), "run"))
    if record is None or not record.get("finished"):
        return None
    diff = _settings_difference(record["settings"], settings)
    if diff:
        raise CheckpointError(f"the finished run in {folder} must have the requested settings "
                              f"to be reused; {diff}. Fix: choose another --out, or pass --force "
                              "to replace it.")
    other = _other_caches(record, identity)
    if other:
        raise CheckpointError(f"the finished run in {folder} must come from these caches to be "
                              f"reused; it was trained on {other}. Fix: choose another --out "
                              "(--force would replace that run).")
    if reuse:
        log.info("reusing finished run %s (val mIoU %.4f)", folder, record["miou"])
        return HeadResult.from_dict(record)
    raise ConfigError(f"the run folder must not hold a finished run; {folder} has one (val "
                      f"mIoU {record['miou']:.4f}). Fix: pass --force to train again, or "
                      "choose another --out.")


def _other_caches(record: dict, identity: tuple[dict, dict]) -> str:
    """How a run record's caches differ from ``identity`` (empty when they are the same caches;
    a cache moved to another path still is)."""
    from featlab.cache.joins import identity_difference

    differ = []
    for split, now in zip(("train", "val"), identity):
        then = record.get(split) or {}
        if identity_difference(then, now) is not None:
            differ.append(f"{split} cache {then.get('path')!r}, not {now.get('path')!r}")
    return " and ".join(differ)


def _settings_difference(recorded: dict, settings: HeadSettings) -> str:
    """The first setting in which a run's recorded settings differ from ``settings``, said as
    ``"its lr is 0.01, not 0.1"`` (empty when they are the same; fields added since it was
    recorded count as their defaults)."""
    try:
        then = HeadSettings.from_dict(recorded).to_dict()
    except ConfigError:  # a field this featlab does not know
        return f"it has settings this featlab does not know ({sorted(recorded)})"
    now = settings.to_dict()
    key = next((k for k in now if then[k] != now[k]), None)
    return "" if key is None else f"its {key} is {then[key]!r}, not {now[key]!r}"


def _optimizer(model: _Joint, settings: HeadSettings):
    decay = [p for p in model.head.parameters() if p.ndim > 1]
    rest = [p for p in model.head.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": settings.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    if settings.finetune and model.backbone is not None:
        groups.append({"params": [p for p in model.backbone.parameters() if p.requires_grad],
                       "weight_decay": settings.weight_decay,
                       "lr": settings.lr * settings.backbone_lr})
    for g in groups:
        g.setdefault("lr", settings.lr)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=settings.lr, momentum=settings.momentum)
    return torch.optim.AdamW(groups, lr=settings.lr)


def fit(head: SegHead, train_src, val_src, settings: HeadSettings, folder, *, device,
        progress: bool = True, backbone: nn.Module | None = None, classes=(),
        ignore_index: int = 255, identity=({}, {}), info=None) -> HeadResult:
    """The training loop over two sources (see :mod:`featlab.segment.sources`); resumes from
    ``folder/checkpoint.pt`` when one exists with the same settings."""
    from featlab.runinfo import deterministic_algorithms

    with deterministic_algorithms(settings.deterministic):
        return _fit(head, train_src, val_src, settings, folder, device=device,
                    progress=progress, backbone=backbone, classes=classes,
                    ignore_index=ignore_index, identity=identity, info=info)


def _fit(head, train_src, val_src, settings, folder, *, device, progress, backbone, classes,
         ignore_index, identity, info) -> HeadResult:
    from featlab.runinfo import progress_enabled, run_versions, source_commit
    from featlab.segment.loop import Loop

    device = fdist.resolve_device(device)
    info = info or fdist.init(device=device)
    folder = Path(folder)
    started = time.perf_counter()
    if backbone is None:  # an ImageSource carries the network it runs
        backbone = getattr(train_src, "backbone", None)
    if settings.finetune and backbone is None:
        raise ConfigError("finetune=True needs the backbone; got backbone=None.")
    if backbone is not None and not settings.finetune and not isinstance(backbone,
                                                                        FrozenBackbone):
        backbone = FrozenBackbone(backbone, head.points)
    if settings.finetune:
        for p in backbone.parameters():
            p.requires_grad_(True)
        if fdist.is_distributed() and device.type == "cuda":
            # batch statistics over the global batch, as one process would take them
            backbone = nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    model = _Joint(head, backbone, settings.finetune).to(device)
    opt = _optimizer(model, settings)
    loop = Loop(model, opt, train_src, val_src, settings, device, info,
                num_classes=len(classes), ignore_index=ignore_index,
                progress=progress_enabled(progress) and info.is_main)
    state = fdist.from_main(lambda: runs.load_checkpoint(folder))  # rank 0's, on every node
    resumed = 0
    if state is not None:
        diff = _settings_difference(state["settings"], settings)
        if not diff and (other := _other_caches(dict(zip(("train", "val"), state["identity"])),
                                                identity)):
            diff = f"it was trained on {other}"
        if diff:
            raise CheckpointError(f"the checkpoint in {folder} must come from the same settings "
                                  f"and caches to resume; {diff}. Fix: pass --force to start "
                                  "over, or choose another --out.")
        loop.load_state(state)
        resumed = state["epoch"]
        if info.is_main:
            log.info("resuming %s after epoch %d of %d", folder, resumed, settings.epochs)
    for epoch in range(resumed + 1, settings.epochs + 1):
        loop.run_epoch(epoch)
        if info.is_main:
            runs.save_checkpoint(folder, {**loop.state(), "settings": settings.to_dict(),
                                          "identity": list(identity)})
            runs.write_log(folder, loop.history)
        fdist.barrier()
    cm, per_image = loop.evaluate(per_image=True)
    metrics = cm.to_dict(list(classes) if classes else None)
    per_image_miou = miou_per_image_mean(per_image)  # a separate number, named so
    metrics["miou_per_image_mean"] = None if math.isnan(per_image_miou) else per_image_miou
    result = HeadResult(
        folder=os.path.abspath(folder), settings=settings.to_dict(), miou=metrics["miou_dataset"],
        pixel_accuracy=metrics["pixel_accuracy"], mean_accuracy=metrics["mean_accuracy"],
        metrics=metrics, history=tuple(loop.history), epochs_done=settings.epochs,
        seconds=round(time.perf_counter() - started, 2),
        train_images_per_second=round(loop.images_per_second(), 1), device=str(device),
        world_size=info.world_size, seed=settings.seed, train=identity[0], val=identity[1],
        versions=run_versions(torch.device(device)), git=source_commit(),
        resumed_from_epoch=resumed)
    if info.is_main:
        runs.write_confusions(folder, per_image)
        runs.write_json(folder / runs.RUN_JSON, result.to_dict() | {"finished": True})
        log.info("%s: val mIoU %.4f (pixel accuracy %.4f) after %d epoch%s in %.1f s -> %s",
                 run_name(settings), result.miou, result.pixel_accuracy, settings.epochs,
                 "" if settings.epochs == 1 else "s", result.seconds, folder)
    fdist.barrier()
    return result


def evaluate(head: SegHead, source, *, device="cpu", num_classes: int | None = None,
             ignore_index: int = 255, batch_size: int = 32) -> ConfusionMatrix:
    """Data-set-level confusion matrix of ``head`` over a source (this process's samples)."""
    cm = ConfusionMatrix(num_classes or head.num_classes, ignore_index)
    head.eval()
    with torch.no_grad():
        for start in range(0, len(source), batch_size):
            feats, labels = source.get(range(start, min(len(source), start + batch_size)),
                                       device)
            cm.update(head(feats, labels.shape[-2:]).argmax(1), labels)
    return cm

