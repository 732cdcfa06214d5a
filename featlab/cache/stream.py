"""The streaming loop of an extraction: loader -> forward with taps -> bounded queue -> writer.

The main thread loads batches in the sorted order, runs the forward (eval mode, inference mode,
checked at every batch) and lets :class:`~featlab.cache.taps.Taps` fill a reusable
:class:`~featlab.cache.taps.Slot`; a bounded queue hands slots to :class:`Writer`, the only
thread that calls h5py while samples stream, which writes rows, flushes, flags them written,
flushes, and hands the slot back. On a GPU the copies are asynchronous into pinned memory: a
batch is handed over once its CUDA event has completed (one batch late, so the device keeps
computing meanwhile). An error in the writer thread is raised in the main thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from featlab.cache import h5file
from featlab.cache.plan import max_slots
from featlab.cache.setup import Job
from featlab.cache.taps import Slot, Taps, check_eval
from featlab.errors import CacheError, ConfigError, FeatlabError

__all__ = ["stream", "pending_batches", "Writer"]

# The writer thread runs at a lower priority: on a CPU that the forward keeps busy, writing then
# fills the forward's gaps instead of preempting one of its threads (which stalls the whole
# parallel region that thread belongs to). If it falls behind, the bounded queue makes the main
# thread wait, and it catches up; on a GPU machine there are idle cores and it makes no difference.
WRITER_NICE = 10


def pending_batches(rows: int, batch_size: int, written: np.ndarray
                    ) -> list[tuple[int, int, tuple]]:
    """``(start, n, runs)`` of every batch with unwritten rows; batches stay aligned to the start
    of the file whatever was written before, so a recomputed batch has the same composition."""
    out = []
    for start in range(0, rows, batch_size):
        flags = written[start:start + batch_size]
        if flags.all():
            continue
        edges = np.flatnonzero(np.diff(np.concatenate([[1], flags, [1]]).astype(np.int8)))
        runs = tuple((int(a), int(b)) for a, b in zip(edges[::2], edges[1::2]))
        out.append((start, len(flags), runs))
    return out


def stream(job: Job, path: str, written: np.ndarray, *, progress: bool, stop_early: bool
           ) -> None:
    """Compute and write every row of ``path`` (the open partial file) not flagged in ``written``.

    The model is run in eval mode on ``job.device`` and left in the training mode and on the
    device it came with; errors of the writer thread are raised here.
    """
    from torch.utils.data import DataLoader

    batches = pending_batches(len(job.shard), job.batch_size, written)
    offset = job.shard.start
    device = job.device
    cuda = device.type == "cuda"
    loader = DataLoader(job.dataset, batch_sampler=[list(range(offset + s, offset + s + n))
                                                    for s, n, _ in batches],
                        num_workers=job.num_workers, pin_memory=cuda, collate_fn=collate)
    pts = job.points
    # pinned buffers and the loader's pinning thread belong to the current CUDA device: make it
    # ours first, or a run on cuda:1 also opens a context on GPU 0
    place = torch.cuda.device(device) if cuda else contextlib.nullcontext()
    shapes = [(p.channels if c is None else len(c), *s)
              for p, s, c in zip(pts, job.stored, job.channels)]

    def make_slot() -> Slot:
        with place:
            return Slot(job.batch_size, shapes, getattr(torch, job.settings.dtype),
                        job.settings.input_size, job.settings.save_images, pin=cuda)

    bar = _progress_bar(progress, len(job.shard), int(written.sum()), job)
    writer = Writer(path, [p.name for p in pts], job.settings.save_images, make_slot,
                    max_slots(job.queue_size, cuda), job.queue_size,
                    bar.update if bar is not None else None)
    root, modules = job.root, list(job.root.modules())
    names = {id(m): n for n, m in root.named_modules()}
    modes = [(m, m.training) for m in modules]
    moved = _move(root, device)
    param = next(root.parameters(), None)
    in_dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        root.eval()
        with place:
            batches_iter = iter(loader)  # workers fork before the writer thread starts
        writer.start()
        taps = Taps(root, [p.name for p in pts], [p.module for p in pts],
                    [(p.channels, *p.size) for p in pts], job.stored, job.channels,
                    getattr(torch, job.settings.dtype), job.settings.error_stat, stop_early)
        normalize = _normalizer(job.spec, device)
        lagging: Slot | None = None
        with place, torch.inference_mode(), taps:
            for (start, n, runs), batch in zip(batches, batches_iter):
                check_eval(modules, names)  # nothing may have switched to .train()
                _check_batch(job, batch, offset + start, n)
                slot = writer.take()
                slot.start, slot.n, slot.runs = start, n, runs
                slot.labels = batch["mask"].numpy()
                images = batch["image"].to(device, non_blocking=True)
                if slot.images is not None:
                    slot.images[:n].copy_(images.mul(255).round_().to(torch.uint8),
                                          non_blocking=cuda)
                x = normalize(images).to(in_dtype)
                taps.run(x, slot, n)
                if not cuda:
                    writer.submit(slot)
                    continue
                # the device-to-host copies are queued on the stream; hand the *previous* batch
                # to the writer once its copies are done, while this one still computes
                slot.event = torch.cuda.Event()
                slot.event.record(torch.cuda.current_stream(device))
                if lagging is not None:
                    lagging.event.synchronize()
                    writer.submit(lagging)
                lagging = slot
            if lagging is not None:
                lagging.event.synchronize()
                writer.submit(lagging)
        writer.finish()
    except BaseException:
        writer.finish(raise_error=False)
        raise
    finally:
        for module, training in modes:
            module.training = training
        if moved is not None:
            root.to(moved)
        if bar is not None:
            bar.close()


def _lower_priority(nice: int) -> None:
    """Lower the calling thread's CPU priority by ``nice`` (Linux only: there each thread is a
    task with its own nice value; elsewhere the call would renice the whole process)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except OSError:  # not permitted: write at normal priority
        pass


def collate(samples: list[dict]) -> dict:
    """``default_collate``, refusing samples of different sizes with a featlab error."""
    from torch.utils.data import default_collate

    shapes = sorted({tuple(s["image"].shape) for s in samples})
    if len(shapes) > 1:
        raise ConfigError(f"every sample must have the same size to be stored as one array; got "
                          f"images of shapes {shapes[:3]} in one batch (ids "
                          f"{[s['id'] for s in samples[:3]]}). Fix: load the data set with "
                          "size=S (--input-size S), which resizes and centre-crops every sample.")
    return default_collate(samples)


def _normalizer(spec: Any, device: torch.device):
    """``spec.normalize`` with mean and std made once on ``device`` (a per-batch host-to-device
    copy of two small tensors would stall the CUDA pipeline); the same arithmetic."""
    mean = torch.tensor(spec.mean, dtype=torch.float32, device=device).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32, device=device).view(3, 1, 1)
    return lambda images: (images - mean) / std


def _check_batch(job: Job, batch: dict, first: int, n: int) -> None:
    expected = job.ids[first - job.shard.start:first - job.shard.start + n]
    if list(batch["id"]) != list(expected):
        raise ConfigError(f"the data set must return its samples in the order of its ids; got "
                          f"{list(batch['id'])[:3]}... for samples {first}..{first + n - 1}, "
                          f"whose ids are {list(expected)[:3]}.... Fix: make __getitem__(i) "
                          "return ids[i].")
    h, w = job.settings.input_size
    if tuple(batch["image"].shape) != (n, 3, h, w) or tuple(batch["mask"].shape) != (n, h, w):
        raise ConfigError(f"every sample must be 3x{h}x{w} (the input size of sample 0); got "
                          f"images {list(batch['image'].shape)} and masks "
                          f"{list(batch['mask'].shape)} at samples {first}..{first + n - 1}. "
                          "Fix: load the data set with size=S (--input-size S).")
    if batch["mask"].dtype != torch.uint8:
        raise ConfigError(f"masks must be uint8 class indices (255 = ignore); got "
                          f"{batch['mask'].dtype}. Fix: follow the SegmentationDataset protocol.")


def _move(root: nn.Module, device: torch.device) -> torch.device | None:
    param = next(root.parameters(), None)
    if param is None:
        param = next(root.buffers(), None)
    if param is None or param.device == device:
        return None
    original = param.device
    root.to(device)
    return original


def _progress_bar(progress: bool, total: int, initial: int, job: Job):
    if not progress or os.environ.get("FEATLAB_PROGRESS", "1") == "0" or not job.info.is_main:
        return None
    from tqdm.auto import tqdm

    shard = (f" (rank 0's shard of {job.info.world_size})" if job.info.world_size > 1 else "")
    return tqdm(total=total, initial=initial, unit="img", dynamic_ncols=True,
                desc=f"extract {os.path.basename(job.paths.out)}{shard}")


class Writer(threading.Thread):
    """The thread that owns the HDF5 file while samples stream (h5py is called only here)."""

    def __init__(self, path: str, point_names: Sequence[str], save_images: bool,
                 make_slot: Callable[[], Slot], max_slots: int, queue_size: int, on_rows: Any):
        super().__init__(name="featlab-cache-writer", daemon=True)
        self.path, self.point_names, self.save_images = path, list(point_names), save_images
        self.jobs: queue.Queue[Slot | None] = queue.Queue(maxsize=queue_size)
        # Slots are made when a batch finds none free, up to max_slots (plan.max_slots).
        # A writer that keeps up cycles two. Slots made up front but never used would still
        # cost: with freed memory kept (the command's setting) malloc serves them from the heap
        # the forward had already faulted in, and the forward faults in fresh pages instead
        # (resnet18, 128 px, batch 32: ~20k more page faults, ~3 % of the run). Last in, first
        # out: the slot handed back most recently is reused first, warmer in the caches.
        self.free: queue.Queue[Slot] = queue.LifoQueue()
        self.make_slot, self.max_slots, self.slots = make_slot, max_slots, 0
        self.on_rows = on_rows
        self.error: BaseException | None = None

    def run(self) -> None:
        if WRITER_NICE:
            _lower_priority(WRITER_NICE)
        out = None
        try:
            out = h5file.RowWriter(self.path, self.point_names, self.save_images)
        except BaseException as err:  # noqa: BLE001 - handed to the main thread
            self.error = err
        while True:  # after an error, keep draining so that the main thread never blocks
            slot = self.jobs.get()
            if slot is None:
                break
            if self.error is None:
                try:
                    out.write(slot.start, slot.runs, slot.point_arrays, slot.labels,
                              None if slot.images is None else slot.images.numpy(),
                              slot.nonfinite.numpy(), slot.abs_error.numpy())
                    if self.on_rows is not None:
                        self.on_rows(sum(b - a for a, b in slot.runs))
                except BaseException as err:  # noqa: BLE001
                    self.error = err
            slot.labels, slot.event = None, None
            self.free.put(slot)
        if out is not None:
            try:
                out.close()
            except BaseException as err:  # noqa: BLE001
                self.error = self.error or err

    def _check(self) -> None:
        err = self.error
        if err is None:
            return
        if isinstance(err, OSError) and not isinstance(err, FeatlabError):
            raise CacheError(f"writing rows to {self.path} must succeed; it failed ({err}). The "
                             "rows flagged as written are intact and the cache is resumable. "
                             "Fix: free disk space (or fix the folder), then re-run the same "
                             "command to resume.") from err
        raise err

    def take(self) -> Slot:
        while True:
            self._check()
            try:
                return self.free.get_nowait()
            except queue.Empty:
                if self.slots < self.max_slots:
                    self.slots += 1
                    return self.make_slot()
            try:
                return self.free.get(timeout=0.5)
            except queue.Empty:
                if not self.is_alive():
                    self._check()
                    raise CacheError(f"the writer thread of {self.path} stopped unexpectedly. "
                                     "Fix: re-run the same command to resume.") from None

    def submit(self, slot: Slot) -> None:
        while True:
            self._check()
            try:
                self.jobs.put(slot, timeout=0.5)
                return
            except queue.Full:
                if not self.is_alive():
                    self._check()
                    raise CacheError(f"the writer thread of {self.path} stopped unexpectedly. "
                                     "Fix: re-run the same command to resume.") from None

    def finish(self, raise_error: bool = True) -> None:
        if self.is_alive():
            self.jobs.put(None)  # the thread drains until it sees this, so put never waits long
            self.join()
        if raise_error:
            self._check()
