"""The epoch loop of head training: shuffling, steps, poly LR, evaluation, resumable state.

Shuffling uses ``DistributedSampler(seed=settings.seed)`` with ``set_epoch(epoch)``, so the order
of every epoch is a function of ``(seed, epoch)`` and a resumed run sees the same batches as an
uninterrupted one; with ``K`` ranks and a global batch ``B``, rank ``r`` takes every ``K``-th
sample of each global batch (``B / K`` samples), so the union of the ranks' batches is the
single-process batch, and each rank's loss is scaled so that the averaged gradient is that of
the mean over the global batch's kept pixels (ranks keep different numbers of pixels). When
``K`` does not divide the training set, ``DistributedSampler`` repeats a few samples to even
out the last batch. Validation splits the val samples into contiguous shards and sums the
confusion matrices over ranks.
"""

from __future__ import annotations

import logging
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DistributedSampler

from featlab import distributed as fdist
from featlab.errors import ConfigError, FeatlabWarning, TrainingDivergedError
from featlab.segment.metrics import ConfusionMatrix

log = logging.getLogger("featlab")

__all__ = ["Loop", "per_image_confusion", "segmentation_loss"]


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255
                      ) -> torch.Tensor:
    """Cross-entropy of ``[b, C, H, W]`` logits, mean over the pixels not ``ignore_index``.

    With every pixel ignored it is 0, still connected to the graph (DDP syncs every step).
    Under ``torch.use_deterministic_algorithms`` it is taken by ``log_softmax`` and ``gather``,
    whose gradients are deterministic (CUDA's ``NLLLoss`` has no deterministic kernel).

    Examples:
        >>> logits = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])  # 2 classes, 1 x 2 pixels
        >>> round(segmentation_loss(logits, torch.tensor([[[0, 255]]])).item(), 4)
        0.1269
    """
    keep = labels != ignore_index
    kept = keep.sum().clamp_min(1)  # no host sync: a GPU keeps computing while the host queues
    if torch.are_deterministic_algorithms_enabled():
        picked = F.log_softmax(logits, 1).gather(1, torch.where(keep, labels, 0)[:, None])
        return -(picked[:, 0] * keep).sum() / kept
    # the sum over the kept pixels / their count: bit for bit cross_entropy's mean, and 0
    # (not 0/0) when every pixel is ignored
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum") / kept


def per_image_confusion(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                        ignore_index: int | None = 255) -> torch.Tensor:
    """``[b, C, C]`` int64 confusion matrices (rows: label) of a batch, one per image.

    Examples:
        >>> p = torch.tensor([[[0, 1]], [[1, 1]]]); t = torch.tensor([[[0, 0]], [[1, 255]]])
        >>> per_image_confusion(p, t, 2).tolist()
        [[[1, 1], [0, 0]], [[0, 0], [0, 1]]]
    """
    b, c = pred.shape[0], num_classes
    p, t = pred.reshape(b, -1).long(), target.reshape(b, -1).long()
    keep = t != ignore_index if ignore_index is not None else torch.ones_like(t, dtype=torch.bool)
    flat = (torch.arange(b, device=t.device)[:, None] * c * c + t * c + p)[keep]
    return torch.bincount(flat, minlength=b * c * c).reshape(b, c, c)


class _Ids:
    """A sized stand-in dataset for ``DistributedSampler``."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class Loop:
    """Training state and steps of one head (see :func:`featlab.segment.train.fit`)."""

    def __init__(self, model, opt, train_src, val_src, settings, device, info, *,
                 num_classes: int, ignore_index: int = 255, progress: bool = True,
                 eval_batch_size: int = 32):
        from torch.nn.parallel import DistributedDataParallel

        self.model, self.opt, self.settings = model, opt, settings
        self.train_src, self.val_src = train_src, val_src
        self.device, self.info, self.progress = torch.device(device), info, progress
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.eval_batch_size = eval_batch_size
        world = info.world_size
        if settings.batch_size % world:
            raise ConfigError(f"batch_size must be a multiple of the number of processes "
                              f"({world}); got {settings.batch_size}. Fix: e.g. --batch-size "
                              f"{world * max(1, settings.batch_size // world)}.")
        self.local_batch = settings.batch_size // world
        if settings.batch_size > len(train_src) and info.is_main:
            warnings.warn(f"batch_size {settings.batch_size} exceeds the {len(train_src)} training "
                          f"samples: one optimizer step per epoch ({settings.epochs} in all). "
                          f"Fix: e.g. --batch-size {max(1, min(16, len(train_src) // 4))}.",
                          FeatlabWarning, stacklevel=4)
        self.sampler = DistributedSampler(_Ids(len(train_src)), num_replicas=world,
                                          rank=info.rank, shuffle=True, seed=settings.seed)
        self.steps_per_epoch = math.ceil(self.sampler.num_samples / self.local_batch)
        total = max(1, settings.epochs * self.steps_per_epoch)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: max(0.0, 1.0 - step / total) ** settings.poly_power)
        self.net = model
        if fdist.is_distributed():
            fdist.require_own_gpus(self.device)
            # fine-tuning runs the whole backbone, but the layers after the deepest point
            # (a classifier's pool and fc) give the loss nothing: DDP must expect no gradient
            self.net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=settings.finetune)
        self.history: list[dict] = []
        self.train_seconds, self.train_images = 0.0, 0

    # ---- state --------------------------------------------------------------------------------
    def state(self) -> dict:
        s = {"epoch": len(self.history), "head": self.model.head.state_dict(),
             "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
             "history": list(self.history), "train_seconds": self.train_seconds,
             "train_images": self.train_images}
        if self.settings.finetune:
            s["backbone"] = self.model.backbone.state_dict()
        return s

    def load_state(self, state: dict) -> None:
        self.model.head.load_state_dict(state["head"])
        if self.settings.finetune:
            self.model.backbone.load_state_dict(state["backbone"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.history = [dict(h) for h in state["history"]]
        self.train_seconds = state["train_seconds"]
        self.train_images = state["train_images"]

    def images_per_second(self) -> float:
        return self.train_images / self.train_seconds if self.train_seconds else 0.0

    # ---- steps --------------------------------------------------------------------------------
    def run_epoch(self, epoch: int) -> dict:
        from tqdm.auto import tqdm

        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        self.model.train()
        # the losses add up on the device: reading one back (.item()) would make the host wait
        # for the GPU every step, so the bar shows the latest loss about once a second
        total, steps = torch.zeros((), dtype=torch.float64, device=self.device), 0
        t0 = time.perf_counter()
        shown = -math.inf
        bar = tqdm(total=len(order) * self.info.world_size, unit="img", leave=False,
                   desc=f"epoch {epoch}/{self.settings.epochs}", disable=not self.progress)
        for start in range(0, len(order), self.local_batch):
            inputs, labels = self.train_src.get(order[start:start + self.local_batch],
                                                self.device)
            loss = segmentation_loss(self.net(inputs, labels.shape[-2:]), labels,
                                     self.ignore_index)
            if self.info.world_size > 1:
                loss = self._global_mean(loss, labels)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
            total += loss.detach()
            steps += 1
            bar.update(len(labels) * self.info.world_size)
            if self.progress and time.perf_counter() - shown >= 1.0:
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                shown = time.perf_counter()
        bar.close()
        mean = total.item() / max(steps, 1)  # waits for the device: the epoch's time is all in
        self.train_seconds += time.perf_counter() - t0
        self.train_images += len(order) * self.info.world_size
        # gathered: every rank sees a diverged step of any rank and stops with the others
        loss = float(np.mean(fdist.all_gather_object(mean)))
        if not math.isfinite(loss):
            s = self.settings
            raise TrainingDivergedError(
                f"training must keep a finite loss; epoch {epoch} ended with mean loss {loss} "
                f"(lr {s.lr:g}, {s.optimizer}): the head's weights are lost, so this epoch is "
                "not saved and the run stays unfinished. Fix: lower --lr (default 3e-3 with "
                "adamw) and re-run with --force.")
        cm, _ = self.evaluate()
        row = {"epoch": epoch, "loss": round(loss, 6), "lr": self.opt.param_groups[0]["lr"],
               "val_miou": round(cm.miou(), 6), "val_pixel_accuracy": round(cm.pixel_accuracy(),
                                                                            6),
               "val_mean_accuracy": round(cm.mean_accuracy(), 6),
               "seconds": round(self.train_seconds, 2)}
        self.history.append(row)
        log.debug("epoch %d: %s", epoch, row)
        if self.progress:
            log.info("epoch %d/%d: loss %.4f, val mIoU %.4f", epoch, self.settings.epochs,
                     row["loss"], row["val_miou"])
        return row

    def _global_mean(self, loss: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """This rank's mean loss rescaled so that DDP's average of the ranks' gradients is the
        gradient of the mean over every kept pixel of the global batch, as in one process."""
        import torch.distributed as dist

        kept = (labels != self.ignore_index).sum()
        total = kept.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return loss * (kept * self.info.world_size / total.clamp_min(1))

    def evaluate(self, per_image: bool = False) -> tuple[ConfusionMatrix, np.ndarray | None]:
        """Confusion matrix over the whole val set (summed over ranks) and, optionally, the
        per-image matrices ``[N, C, C]`` in sample order (gathered from every rank)."""
        cm = ConfusionMatrix(self.num_classes, self.ignore_index, device=self.device)
        mine = fdist.shard_range(len(self.val_src), self.info.rank, self.info.world_size)
        parts = []
        self.model.eval()
        with torch.no_grad():
            for start in range(mine.start, mine.stop, self.eval_batch_size):
                inputs, labels = self.val_src.get(
                    range(start, min(mine.stop, start + self.eval_batch_size)), self.device)
                pred = self.model(inputs, labels.shape[-2:]).argmax(1)
                cm.update(pred, labels)
                if per_image:
                    parts.append(per_image_confusion(pred, labels, self.num_classes,
                                                     self.ignore_index).cpu().numpy())
        cm.all_reduce()
        if not per_image:
            return cm, None
        c = self.num_classes
        local = np.concatenate(parts) if parts else np.zeros((0, c, c), np.int64)
        return cm, np.concatenate(fdist.all_gather_object(local))
