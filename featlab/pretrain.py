"""Train a backbone as a classifier on the embedded ``shapes`` data set (``featlab pretrain``).

So that the embedded default studies *trained* features, a backbone learns an ImageNet-like,
object-centric task: each sample is a square crop around one mostly visible object of a rendered
``shapes`` scene (with whatever distractors fall in the crop), and the label is that object's
class. Crops come from scenes rendered at ``scene_size`` (128 px, the size the data set is used at
later), their side is ``crop_scale`` times the object's diameter and they are resized to
``image_size``; with the defaults an object spans 28-40 px of a 48 px crop, about the median
object diameter in a 128 px scene (31 px), so features are learnt at the scale they are studied
at. Whole-scene labels (the class of the largest visible object) and loose 64 px windows stayed
near chance for 6-45 thousand training images in our trials: the class is carried by shape alone
(textures ignore the class), and a small object on a textured background is a weak signal.

Every sample is a pure function of ``(seed, split, index)`` (fresh samples every step, rendered in
DataLoader workers), training is seeded, and the result is cached under
``featlab.models.weights_dir()`` by a key that hashes the model name and the settings.

Examples:
    >>> s = PretrainSettings(steps=10)
    >>> PretrainSettings.from_dict(s.to_dict()) == s, settings_key("resnet18", s) != settings_key(
    ...     "resnet18", PretrainSettings(steps=11))
    (True, True)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featlab import models
from featlab._records import with_overrides
from featlab.distributed import resolve_device
from featlab.errors import (CheckpointError, ConfigError, InputSizeError, UnknownNameError,
                            did_you_mean)
from featlab.runinfo import progress_enabled, run_versions

log = logging.getLogger("featlab")

FORMAT = 1  # bump when the checkpoint layout or the meaning of a setting changes
DATASETS = ("shapes",)


@dataclass(frozen=True)
class PretrainSettings:
    """Everything that determines the trained weights (hashed into the cache key).

    Attributes:
        steps: optimizer steps (fresh samples every step).
        batch_size: crops per step.
        image_size: side of the training crops, in pixels.
        scene_size: side of the rendered scenes the crops are cut from; becomes the
            ``input_size`` of the saved :class:`~featlab.models.BackboneSpec`.
        lr: peak AdamW learning rate (linear warmup, then cosine decay to zero).
        weight_decay: AdamW weight decay (not applied to norms and biases).
        warmup_steps: steps of linear learning-rate warmup.
        label_smoothing: cross-entropy label smoothing.
        crop_scale: range of crop side / object diameter (training draws uniformly; evaluation
            uses the middle).
        min_visible: an object is a crop target when at least this fraction of it is visible.
        num_objects, object_size: options of the ``shapes`` scenes (see ``featlab.data.shapes``).
        val_images: held-out crops (from the ``val`` split) the accuracy is measured on.
        eval_every: steps between evaluations recorded in the history.
        seed: seeds the initialisation, the training order and the scenes.
    """

    steps: int = 600
    batch_size: int = 32
    image_size: int = 48
    scene_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.05
    warmup_steps: int = 40
    label_smoothing: float = 0.0
    crop_scale: tuple[float, float] = (1.2, 1.7)
    min_visible: float = 0.5
    num_objects: tuple[int, int] = (2, 5)
    object_size: tuple[float, float] = (0.1, 0.6)
    val_images: int = 500
    eval_every: int = 100
    seed: int = 0

    def __post_init__(self):
        for name in ("crop_scale", "num_objects", "object_size"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        positive = ("steps", "batch_size", "image_size", "scene_size", "val_images", "eval_every")
        bad = [f"{n}={getattr(self, n)!r}" for n in positive
               if not isinstance(getattr(self, n), int) or getattr(self, n) < 1]
        if self.batch_size == 1:
            bad.append("batch_size=1 (batch norm needs two samples)")
        if not self.lr > 0 or self.weight_decay < 0 or not 0 <= self.label_smoothing < 1:
            bad.append(f"lr={self.lr}, weight_decay={self.weight_decay}, "
                       f"label_smoothing={self.label_smoothing}")
        if not 0 <= self.warmup_steps or not 0 <= self.min_visible <= 1 or self.seed < 0:
            bad.append(f"warmup_steps={self.warmup_steps}, min_visible={self.min_visible}, "
                       f"seed={self.seed}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1]:
            bad.append(f"crop_scale={self.crop_scale}")
        if bad:
            raise ConfigError(
                f"PretrainSettings need positive sizes and counts, lr > 0, weight_decay >= 0, "
                f"0 <= label_smoothing < 1, 0 <= min_visible <= 1, seed >= 0 and crop_scale "
                f"(lo, hi) with 0 < lo <= hi; got {'; '.join(bad)}. Fix: correct those values."
            )

    def to_dict(self) -> dict:
        """JSON-able dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> PretrainSettings:
        """Inverse of :meth:`to_dict`; unknown keys raise :class:`ConfigError`."""
        return models._from_dict(cls, d)


@dataclass(frozen=True)
class PretrainResult:
    """What a pretraining run produced (also stored in the checkpoint under ``"result"``).

    Attributes:
        model, data: backbone and data set names.
        key: the settings key (``weights="shapes:<key>"``).
        checkpoint: path of the saved checkpoint.
        accuracy: held-out accuracy on ``val_images`` crops of the ``val`` split.
        chance: ``1 / number of object classes``.
        prior: accuracy of always answering the most frequent training label.
        seconds: wall time of the run that trained the weights (setup, training, evaluation).
        steps: optimizer steps taken.
        images_per_second: training crops per second (data, forward, backward, update).
        device: where it was trained.
        settings: ``PretrainSettings.to_dict()``.
        history: one dict per evaluation: step, seconds, loss (mean since the last), val_accuracy.
        reused: True when an existing checkpoint was returned without training.
        versions: featlab, torch, torchvision, numpy and python versions of the training run.
    """

    model: str
    data: str
    key: str
    checkpoint: str
    accuracy: float
    chance: float
    prior: float
    seconds: float
    steps: int
    images_per_second: float
    device: str
    settings: dict
    history: tuple = ()
    reused: bool = False
    versions: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["history"] = [dict(h) for h in self.history]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PretrainResult:
        d = dict(d)
        d["history"] = tuple(d.get("history", ()))
        return models._from_dict(cls, d)


def settings_key(model: str, settings: PretrainSettings, data: str = "shapes") -> str:
    """12 hex digits identifying (model, data, settings, data generator, checkpoint format)."""
    from featlab.data.shapes import GENERATOR

    blob = json.dumps({"model": model, "data": data, "generator": GENERATOR, "format": FORMAT,
                       "settings": settings.to_dict()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def checkpoint_path(model: str, settings: PretrainSettings) -> Path:
    """Where :func:`pretrain` writes (and looks for) the weights of ``model`` with ``settings``."""
    return models.shapes_checkpoint_path(model, settings_key(model, settings))


class ObjectCrops(torch.utils.data.Dataset):
    """Crops around one object of each ``shapes`` scene; sample ``i`` is ``(image, label)`` with
    image float32 ``[3, image_size, image_size]`` in [0, 1] and label the object's class index.

    Examples:
        >>> ds = ObjectCrops("val", PretrainSettings(image_size=32), length=2)
        >>> x, y = ds[0]
        >>> tuple(x.shape), 1 <= y <= 8
        ((3, 32, 32), True)
    """

    def __init__(self, split: str, settings: PretrainSettings, length: int, train: bool = False):
        from featlab.data.shapes import SPLITS, ShapesDataset

        self.settings, self.train, self.length = settings, train, length
        self.split_code = SPLITS[split]
        self.scenes = ShapesDataset(split, size=settings.scene_size, seed=settings.seed,
                                    length=length, num_objects=settings.num_objects,
                                    object_size=settings.object_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        s = self.settings
        image, _, objects = self.scenes.scene(i)
        # a second stream for the crop choices, so that the scenes stay those of the data set
        rng = np.random.default_rng([s.seed, 7919, self.split_code, i])
        targets = [o for o in objects if o.visible_area >= max(16, s.min_visible * o.area)]
        target = (targets[int(rng.integers(len(targets)))] if targets
                  else max(objects, key=lambda o: o.visible_area))
        lo, hi = s.crop_scale
        scale = lo + (hi - lo) * rng.random() if self.train else 0.5 * (lo + hi)
        size = image.shape[0]
        side = int(min(size, max(8, round(scale * target.size))))
        shift = rng.uniform(-0.1, 0.1, 2) * side if self.train else np.zeros(2)
        y0, x0 = (int(min(size - side, max(0, round(c - side / 2 + d))))
                  for c, d in zip(target.centre, shift))
        crop = torch.from_numpy(np.ascontiguousarray(image[y0:y0 + side, x0:x0 + side]))
        crop = crop.permute(2, 0, 1)[None].float().div_(255.0)
        crop = F.interpolate(crop, size=(s.image_size, s.image_size), mode="bilinear",
                             antialias=True, align_corners=False)[0].clamp_(0.0, 1.0)
        if self.train and rng.random() < 0.5:
            crop = crop.flip(-1)
        return crop, target.class_index


def pretrain(model: str = "resnet18", data: str = "shapes", *,
             settings: PretrainSettings | None = None, seed: int | None = None,
             device: str | torch.device | None = None, progress: bool = True,
             force: bool = False, num_workers: int | None = None, threads: int | None = None,
             **overrides) -> PretrainResult:
    """Train ``model`` on crops of ``data`` (or reuse the cached checkpoint) and report.

    Args:
        model: a registered backbone (``featlab.list_backbones()``).
        data: the data set; only ``"shapes"``.
        settings: the recipe (default :class:`PretrainSettings`); ``overrides`` and ``seed``
            replace single fields, e.g. ``pretrain("resnet18", steps=50, image_size=32)``.
        seed: shorthand for the ``seed`` setting.
        device: ``"cpu"``, ``"cuda"``, ... (default: CUDA when available, else CPU).
        progress: tqdm progress bar (env ``FEATLAB_PROGRESS=0`` disables it too).
        force: train again even if the checkpoint exists.
        num_workers: DataLoader workers rendering samples (default: half the CPUs, 1..8).
        threads: torch intra-op threads while training (default: torch's setting, capped so that
            threads + workers <= CPUs; restored afterwards). Oversubscribed cores stall every
            parallel op at its barrier: on a loaded 2-core machine, 1 thread + 1 worker trained
            5x faster than 2 threads + 1 worker. Results are bit-identical for one thread count
            on one machine; other thread counts give other weights under the same key.

    Returns:
        The :class:`PretrainResult`; ``result.reused`` says whether it was trained now.

    Examples:
        >>> r = pretrain("resnet18", steps=1, batch_size=2, image_size=32, val_images=4,
        ...              progress=False)  # doctest: +SKIP
    """
    models._entry(model)  # unknown model -> UnknownNameError with suggestions
    if data not in DATASETS:
        raise UnknownNameError(f"`data` of pretrain must be one of {', '.join(DATASETS)}; got "
                               f"{data!r}.{did_you_mean(str(data), DATASETS)}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ConfigError(f"`threads` must be an int >= 1; got {threads!r}. Fix: e.g. "
                          "--threads 1.")
    if seed is not None:
        overrides["seed"] = seed
    settings = with_overrides(settings or PretrainSettings(), overrides, "pretrain")
    dev = resolve_device(device)  # a device this machine lacks is refused before anything else
    key = settings_key(model, settings, data)
    path = checkpoint_path(model, settings)
    if path.is_file() and not force:
        return _reuse(path)
    cpus = os.cpu_count() or 1
    workers = num_workers if num_workers is not None else max(1, min(8, cpus // 2))
    if threads is None:
        threads = max(1, min(torch.get_num_threads(), cpus - workers))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(model, data, settings, key, path, dev, progress, workers)
    finally:
        torch.set_num_threads(previous)


def _reuse(path: Path) -> PretrainResult:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        result = PretrainResult.from_dict(ckpt["result"])
    except Exception as err:  # any failure to read it means the same to the user
        raise CheckpointError(
            f"cached pretraining checkpoint {path} must be readable; it is not ({err}). "
            f"Fix: pass force=True (--force) to train again, or delete the file.") from err
    log.info("reusing %s (trained in %.0f s, val accuracy %.3f)", path, result.seconds,
             result.accuracy)
    return dataclasses.replace(result, checkpoint=str(path), reused=True)


def lr_factor(step: int, settings: PretrainSettings) -> float:
    """Learning-rate multiplier: linear warmup to 1, then cosine decay to 0 at ``steps``.

    Examples:
        >>> s = PretrainSettings(steps=100, warmup_steps=10)
        >>> lr_factor(0, s), lr_factor(9, s), lr_factor(10, s), round(lr_factor(55, s), 3)
        (0.1, 1.0, 1.0, 0.5)
    """
    if step < settings.warmup_steps:
        return (step + 1) / settings.warmup_steps
    span = max(1, settings.steps - settings.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * (step - settings.warmup_steps) / span))


def _train(name: str, data: str, settings: PretrainSettings, key: str, path: Path,
           dev: torch.device, progress: bool, workers: int) -> PretrainResult:
    from tqdm.auto import tqdm

    from featlab.data.shapes import CLASSES

    start = time.perf_counter()
    s = settings
    train_set = ObjectCrops("train", s, s.steps * s.batch_size, train=True)
    val_x, val_y = _materialize(ObjectCrops("val", s, s.val_images))
    # the normalization that belongs to these weights: statistics of the first training crops
    stats = _materialize(ObjectCrops("train", s, min(256, len(train_set)), train=True))[0]
    mean = tuple(round(float(v), 4) for v in stats.mean((0, 2, 3)))
    std = tuple(round(float(v), 4) for v in stats.std((0, 2, 3)))
    net, _ = models.get_backbone(name, "none", seed=s.seed, num_classes=len(CLASSES))
    _check_image_size(net, name, s.image_size)
    spec = models.BackboneSpec(name, f"shapes:{key}", mean, std, s.scene_size, len(CLASSES),
                               None, s.seed)
    net = net.to(dev, memory_format=torch.channels_last).train()
    decay = [p for p in net.parameters() if p.ndim > 1]  # no decay on norms and biases
    rest = [p for p in net.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": s.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=s.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, s))
    loader = torch.utils.data.DataLoader(
        train_set, batch_size=s.batch_size, shuffle=False, num_workers=workers,
        worker_init_fn=_worker_init, pin_memory=dev.type == "cuda")
    norm = (torch.tensor(mean, device=dev).view(1, 3, 1, 1),
            torch.tensor(std, device=dev).view(1, 3, 1, 1))
    counts = torch.zeros(len(CLASSES), dtype=torch.long)
    history, losses, train_time = [], [], 0.0
    bar = tqdm(total=s.steps * s.batch_size, unit="img", desc=f"pretrain {name} on {data}",
               disable=not progress_enabled(progress))
    # fork_rng: dropout / stochastic depth draw from a seeded stream; the caller's RNG is untouched
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(s.seed)
        t0 = time.perf_counter()
        for step, (x, y) in enumerate(loader, start=1):
            counts += torch.bincount(y, minlength=len(CLASSES))
            x = ((x.to(dev, non_blocking=True) - norm[0]) / norm[1]).contiguous(
                memory_format=torch.channels_last)
            loss = F.cross_entropy(net(x), y.to(dev), label_smoothing=s.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.update(len(y))
            if step % s.eval_every == 0 or step == s.steps:
                train_time += time.perf_counter() - t0
                acc = _accuracy(net, val_x, val_y, norm, dev)
                history.append({"step": step, "seconds": round(time.perf_counter() - start, 2),
                                "loss": round(float(np.mean(losses)), 4),
                                "val_accuracy": round(acc, 4)})
                losses = []
                bar.set_postfix(step=step, loss=history[-1]["loss"], val_acc=round(acc, 3))
                t0 = time.perf_counter()
    bar.close()
    majority = int(counts.argmax())
    result = PretrainResult(
        model=name, data=data, key=key, checkpoint=str(path), accuracy=history[-1]["val_accuracy"],
        chance=round(1.0 / (len(CLASSES) - 1), 4),  # labels are the object classes, never 0
        prior=round(float((val_y == majority).float().mean()), 4),
        seconds=round(time.perf_counter() - start, 1), steps=s.steps,
        images_per_second=round(s.steps * s.batch_size / train_time, 1), device=str(dev),
        settings=s.to_dict(), history=tuple(history), reused=False, versions=run_versions(dev))
    net = net.to("cpu", memory_format=torch.contiguous_format).eval()
    _save_atomic(path, {
        "format": FORMAT, "state_dict": {k: v.contiguous() for k, v in net.state_dict().items()},
        "spec": spec.to_dict(), "settings": s.to_dict(), "classes": list(CLASSES),
        "result": result.to_dict(), "versions": result.versions})
    log.info("wrote %s: %s val accuracy %.3f (chance %.3f, prior %.3f), %d steps in %.0f s, "
             "%.0f images/s on %s", path, name, result.accuracy, result.chance, result.prior,
             s.steps, result.seconds, result.images_per_second, dev)
    return result


def _check_image_size(net: torch.nn.Module, name: str, size: int) -> None:
    """Refuse crops too small for the network before any training (a measured minimum)."""
    from featlab.points import skip_points

    try:
        skip_points(net, input_size=size)
    except InputSizeError as err:
        smallest = err.minimum or size
        raise InputSizeError(f"`image_size` of pretrain must be at least {smallest} px for "
                             f"{name}; got {size}. Fix: --image-size {smallest} or larger.") \
            from None


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only render; more threads would fight the training loop


def _materialize(ds: ObjectCrops) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.tensor(ys)


def _accuracy(net, x: torch.Tensor, y: torch.Tensor, norm: tuple, dev: torch.device) -> float:
    net.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(x), 250):
            xb = ((x[i:i + 250].to(dev) - norm[0]) / norm[1]).contiguous(
                memory_format=torch.channels_last)
            correct += int((net(xb).argmax(1).cpu() == y[i:i + 250]).sum())
    net.train()
    return correct / len(x)


def _save_atomic(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)  # readers see the old file or the whole new one, never a part
    finally:
        tmp.unlink(missing_ok=True)
