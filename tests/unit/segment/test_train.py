"""Trainer: determinism, resume, records, refusals, R-8.3 cache checks, native-size metrics."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import featlab
import featlab.testing as ft
from featlab.errors import CacheError, CheckpointError, ConfigError, TrainingDivergedError
from featlab.segment import runs
from featlab.segment.loop import per_image_confusion
from featlab.segment.metrics import ConfusionMatrix
from featlab.segment.train import HeadResult, HeadSettings, train_head

from .conftest import SPEC, make_caches

# on the CPU, where training is deterministic (these tests compare runs bit for bit)
FAST = dict(epochs=2, batch_size=8, lr=0.01, device="cpu")


def matrix(result):
    return np.asarray(result.metrics["matrix"])


def test_two_runs_give_identical_confusion_matrices_and_weights(caches, tmp_path):
    a = train_head(*caches, skip="layer1.0", fusion="concat", out=tmp_path / "a",
                   progress=False, **FAST)
    b = train_head(*caches, skip="layer1.0", fusion="concat", out=tmp_path / "b",
                   progress=False, **FAST)
    np.testing.assert_array_equal(matrix(a), matrix(b))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    wa = torch.load(tmp_path / "a" / runs.CHECKPOINT, weights_only=True)["head"]
    wb = torch.load(tmp_path / "b" / runs.CHECKPOINT, weights_only=True)["head"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train_head(*caches, skip="layer1.0", fusion="concat", out=tmp_path / "c",
               progress=False, **{**FAST, "seed": 1})
    assert not all(torch.equal(wa[k], v) for k, v in torch.load(
        tmp_path / "c" / runs.CHECKPOINT, weights_only=True)["head"].items())


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(caches, tmp_path):
    full = train_head(*caches, skip="relu", out=tmp_path / "full", progress=False,
                      preload=False, **{**FAST, "epochs": 3})
    killed = tmp_path / "killed"
    _run_one_epoch_then_stop(caches, killed)
    resumed = train_head(*caches, skip="relu", out=killed, progress=False,
                         **{**FAST, "epochs": 3})
    assert full.resumed_from_epoch == 0 and resumed.resumed_from_epoch == 1
    np.testing.assert_array_equal(matrix(resumed), matrix(full))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    wa = torch.load(tmp_path / "full" / runs.CHECKPOINT, weights_only=True)["head"]
    wb = torch.load(killed / runs.CHECKPOINT, weights_only=True)["head"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _run_one_epoch_then_stop(caches, folder):
    """Train the 3-epoch plan but stop after epoch 1 (what a kill after a checkpoint leaves)."""
    import featlab.segment.loop as loop_mod

    original = loop_mod.Loop.run_epoch

    def run_epoch(self, epoch):
        if epoch > 1:
            raise KeyboardInterrupt
        return original(self, epoch)

    loop_mod.Loop.run_epoch = run_epoch
    try:
        with pytest.raises(KeyboardInterrupt):
            train_head(*caches, skip="relu", out=folder, progress=False,
                       **{**FAST, "epochs": 3})
    finally:
        loop_mod.Loop.run_epoch = original
    assert json.loads((folder / runs.LOG_JSON).read_text())[0]["epoch"] == 1
    assert not (folder / runs.RUN_JSON).exists()


def test_run_folder_records_and_refusals(caches, tmp_path):
    out = tmp_path / "run"
    r = train_head(*caches, out=out, progress=False, **FAST)
    record = json.loads((out / runs.RUN_JSON).read_text())
    assert record["finished"] and record["seed"] == 0 and record["settings"]["skip"] is None
    assert record["train"]["ids_sha256"] == featlab.open_cache(caches[0]).ids_sha256
    assert {"torch", "numpy", "featlab"} <= set(record["versions"]) and record["device"] == "cpu"
    if (Path(featlab.__file__).resolve().parents[1] / ".git").exists():  # the commit
        assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", record["git"])
        assert record["versions"]["git"] == record["git"] and record["versions"]["device"] == "cpu"
    assert HeadResult.from_dict({k: v for k, v in record.items() if k != "finished"} | {
        "finished": True}).miou == r.miou
    with open(out / runs.LOG_CSV) as f:
        rows = list(csv.DictReader(f))
    assert [int(x["epoch"]) for x in rows] == [1, 2] and "val_miou" in rows[0]
    per_image = runs.read_confusions(out)
    assert per_image.shape == (16, 9, 9)
    np.testing.assert_array_equal(per_image.sum(0), matrix(r))
    # R-2.4: the mean of the images' own mIoUs, named apart from the data-set mIoU
    alone = [ConfusionMatrix.from_dict({"num_classes": 9, "ignore_index": 255,
                                        "matrix": m.tolist()}).miou() for m in per_image]
    assert r.metrics["miou_per_image_mean"] == pytest.approx(np.nanmean(alone), abs=1e-12)
    assert r.metrics["miou_dataset"] == r.miou != r.metrics["miou_per_image_mean"]
    assert repr(r) == (f"HeadResult(baseline-seed0: val mIoU {r.miou:.4f}, pixel accuracy "
                       f"{r.pixel_accuracy:.4f}, 2 epochs, folder={str(out)!r})")  # one line
    with pytest.raises(ConfigError, match="finished run"):
        train_head(*caches, out=out, progress=False, **FAST)
    assert train_head(*caches, out=out, progress=False, reuse=True, **FAST).miou == r.miou
    with pytest.raises(CheckpointError, match=r"requested settings to be reused; its lr is 0\.01, "
                                              r"not 0\.1\. Fix"):
        train_head(*caches, out=out, progress=False, reuse=True, **{**FAST, "lr": 0.1})
    # a finished run is reused only for its own caches (wherever they lie now)
    moved = tmp_path / "moved"
    moved.mkdir()
    for path in caches:
        shutil.copy(path, moved / path.name)
    assert train_head(moved / "train.h5", moved / "val.h5", out=out, progress=False,
                      reuse=True, **FAST).miou == r.miou
    (tmp_path / "other").mkdir()
    other = make_caches(tmp_path / "other", seed=1)  # another backbone's features
    with pytest.raises(CheckpointError, match=r"must come from these caches to be reused; it "
                                              r"was trained on train cache .* and val cache"):
        train_head(*other, out=out, progress=False, reuse=True, **FAST)
    # the matrices of a run written before they were compressed still read; --force removes them
    np.save(out / "val_confusion.npy", per_image)
    (out / runs.VAL_CONFUSION).unlink()
    np.testing.assert_array_equal(runs.read_confusions(out), per_image)
    again = train_head(*caches, out=out, progress=False, force=True, **{**FAST, "lr": 0.1})
    assert again.settings["lr"] == 0.1
    assert sorted(p.name for p in out.iterdir() if "confusion" in p.name) == [
        runs.VAL_CONFUSION]


def test_metrics_at_the_label_resolution_match_an_independent_count(caches, tmp_path):
    r = train_head(*caches, skip="layer1.0", out=tmp_path / "r", progress=False, **FAST)
    val = featlab.open_cache(caches[1])
    labels = val.labels[:]
    assert labels.shape[1:] == (32, 32)  # stride-4 logits were upsampled to 32 x 32 labels
    assert matrix(r).sum() == (labels != 255).sum()
    np.testing.assert_array_equal(matrix(r).sum(1), np.bincount(labels[labels != 255].ravel(),
                                                                minlength=9))
    cm = ConfusionMatrix.from_dict(r.metrics)
    assert cm.miou() == pytest.approx(r.miou)


def test_per_image_confusion_equals_confusion_matrix_per_image():
    g = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 3, (4, 5, 6), generator=g)
    target = torch.randint(0, 4, (4, 5, 6), generator=g)
    target[target == 3] = 255
    per = per_image_confusion(pred, target, 3)
    for i in range(4):
        np.testing.assert_array_equal(per[i].numpy(),
                                      ConfusionMatrix(3).update(pred[i], target[i]).matrix)


def test_caches_of_another_backbone_or_the_same_samples_are_refused(caches, tmp_path):
    other = make_caches(tmp_path, n_train=8, n_val=8, seed=1)
    with pytest.raises(CacheError, match="same backbone"):
        train_head(caches[0], other[1], out=tmp_path / "x", progress=False, **FAST)
    with pytest.raises(CacheError, match="different samples"):
        train_head(caches[0], caches[0], out=tmp_path / "y", progress=False, **FAST)
    with pytest.raises(featlab.cache.reader.PointNotInCacheError, match="layer9"):
        train_head(*caches, skip="layer9", out=tmp_path / "z", progress=False, **FAST)
    with pytest.raises(ConfigError, match="before the last"):
        train_head(*caches, skip="layer1.1", out=tmp_path / "z", progress=False, **FAST)
    with pytest.raises(ConfigError, match="optimizer"):
        HeadSettings(optimizer="adam")
    ds = featlab.load_dataset("shapes", split="val", size=32, length=16)
    featlab.extract(ft.TinyResNet(seed=0), ds, "all", tmp_path / "some.h5", spec=SPEC,
                    max_channels=8, dtype="float32", num_workers=0, progress=False)
    with pytest.raises(CacheError, match=r"all its 16 channels .* keeps 8 .*--max-channels"):
        train_head(caches[0], tmp_path / "some.h5", out=tmp_path / "w", progress=False, **FAST)


def test_the_same_weights_from_another_file_are_the_same_backbone(tmp_path):
    """The hashed model state stands for the weights: the same state loaded from another path
    (or a checkpoint file with other metadata) is the same backbone; another state is not."""
    from featlab.segment.sources import check_caches

    def cache(name, split, seed, weights, sha):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=4)
        spec = dataclasses.replace(SPEC, weights=weights, weights_sha256=sha)
        featlab.extract(ft.TinyResNet(seed=seed), ds, "all", tmp_path / name, spec=spec,
                        dtype="float32", num_workers=0, progress=False)
        return featlab.open_cache(tmp_path / name)

    train = cache("train.h5", "train", 0, "file:/scratch/r.pt", "aa" * 32)
    moved = cache("val.h5", "val", 0, "file:/home/me/r.pt", "bb" * 32)
    check_caches(train, moved, ["layer1.1"])  # same state: accepted
    other = cache("other.h5", "val", 1, "file:/scratch/r.pt", "aa" * 32)
    with pytest.raises(CacheError, match=r"weights \(sha256 of the model state\) differs"):
        check_caches(train, other, ["layer1.1"])


def test_sgd_and_a_checkpoint_of_other_settings(caches, tmp_path):
    out = tmp_path / "sgd"
    r = train_head(*caches, out=out, optimizer="sgd", progress=False, **FAST)
    assert r.history[-1]["lr"] == 0.0  # poly schedule reaches zero at the last step
    (out / runs.RUN_JSON).unlink()
    with pytest.raises(CheckpointError, match="same settings and caches to resume; its optimizer "
                                              "is 'sgd', not 'adamw'"):
        train_head(*caches, out=out, progress=False, **FAST)
    (tmp_path / "other").mkdir()
    other = make_caches(tmp_path / "other", seed=1)
    with pytest.raises(CheckpointError, match="to resume; it was trained on train cache .* and "
                                              "val cache"):
        train_head(*other, out=out, progress=False, optimizer="sgd", **FAST)


def test_a_diverged_run_fails_and_is_not_recorded_as_finished(caches, tmp_path):
    out = tmp_path / "diverged"
    with pytest.raises(TrainingDivergedError,
                       match=r"epoch 1 ended with mean loss nan \(lr 1e\+30"):
        train_head(*caches, skip="layer1.0", out=out, progress=False,
                   **{**FAST, "lr": 1e30, "optimizer": "sgd"})
    assert sorted(p.name for p in out.iterdir()) == []  # no checkpoint, no run.json
    with pytest.raises(ConfigError, match="a finite lr > 0.*lr=inf"):
        HeadSettings(lr=float("inf"))


def test_an_unwritable_run_folder_is_refused_before_training(caches, tmp_path, monkeypatch):
    from featlab.segment.loop import Loop

    def never(*args, **kwargs):
        raise AssertionError("trained before finding the folder unwritable")

    monkeypatch.setattr(Loop, "run_epoch", never)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match="run folder must be a folder featlab can write; got "
                                          ".*a-file"):
        train_head(*caches, out=tmp_path / "a-file", progress=False, **FAST)


def test_deterministic_formulations_equal_the_usual_ones():
    """Under deterministic algorithms the logits are upsampled by two matrix products and the
    loss taken by gather: the same values and gradients as interpolate and cross_entropy."""
    import torch.nn.functional as F

    from featlab.segment.heads import upsample
    from featlab.segment.loop import segmentation_loss

    g = torch.Generator().manual_seed(0)
    for (h, w), size in [((8, 8), (32, 32)), ((5, 7), (17, 30)), ((16, 16), (9, 5))]:
        x = torch.randn(2, 4, h, w, generator=g, requires_grad=True)
        labels = torch.randint(0, 4, (2, *size), generator=g)
        labels[:, 0] = 255
        usual = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        usual_loss = F.cross_entropy(usual, labels, ignore_index=255)
        usual_grad, = torch.autograd.grad(usual_loss, x)
        torch.use_deterministic_algorithms(True)
        try:
            ours = upsample(x, size)
            loss = segmentation_loss(ours, labels)
            grad, = torch.autograd.grad(loss, x)
        finally:
            torch.use_deterministic_algorithms(False)
        torch.testing.assert_close(ours, usual, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss, usual_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, usual_grad, rtol=1e-4, atol=1e-6)


def test_the_loss_is_cross_entropy_bit_for_bit_and_zero_when_all_is_ignored():
    """The loss divides the summed cross-entropy by the kept pixels on the device (no host
    sync per step): the same value and gradient as ``cross_entropy``'s mean, to the bit."""
    import torch.nn.functional as F

    from featlab.segment.loop import segmentation_loss

    g = torch.Generator().manual_seed(1)
    for ignored in (0.0, 0.3, 0.9):
        x = torch.randn(3, 5, 11, 13, generator=g) * 4
        labels = torch.randint(0, 5, (3, 11, 13), generator=g)
        labels[torch.rand(3, 11, 13, generator=g) < ignored] = 255
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        usual = F.cross_entropy(a, labels, ignore_index=255)
        ours = segmentation_loss(b, labels)
        usual.backward()
        ours.backward()
        assert torch.equal(ours, usual) and torch.equal(b.grad, a.grad)
    x = torch.randn(1, 2, 3, 3, requires_grad=True)
    loss = segmentation_loss(x, torch.full((1, 3, 3), 255))
    loss.backward()  # connected to the graph: DDP's ranks still meet every step
    assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_loss_does_not_wait_for_the_gpu():
    from featlab.segment.loop import segmentation_loss

    x = torch.randn(2, 4, 8, 8, device="cuda", requires_grad=True)
    labels = torch.randint(0, 4, (2, 8, 8), device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        segmentation_loss(x, labels).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_deterministic_training_is_a_recorded_setting_and_restores_torch(caches, tmp_path):
    usual = train_head(*caches, skip="layer1.0", out=tmp_path / "a", progress=False, **FAST)
    det = train_head(*caches, skip="layer1.0", out=tmp_path / "d", progress=False,
                     deterministic=True, **FAST)
    assert not torch.are_deterministic_algorithms_enabled()  # switched back on return
    assert not torch.backends.cudnn.deterministic
    record = json.loads((tmp_path / "d" / runs.RUN_JSON).read_text())
    assert record["settings"]["deterministic"] is True
    assert record["versions"]["deterministic_algorithms"] is True
    assert record["versions"]["cudnn_deterministic"] is True
    assert usual.versions["deterministic_algorithms"] is False
    # the same training, to float rounding
    np.testing.assert_allclose([h["loss"] for h in det.history],
                               [h["loss"] for h in usual.history], rtol=1e-4)
    with pytest.raises(CheckpointError, match="requested settings"):
        train_head(*caches, skip="layer1.0", out=tmp_path / "d", progress=False, reuse=True,
                   **FAST)  # a run made otherwise is not reused for it
    # a run recorded before the setting existed counts as deterministic=False
    path = tmp_path / "a" / runs.RUN_JSON
    old = json.loads(path.read_text())
    del old["settings"]["deterministic"]
    path.write_text(json.dumps(old))
    assert train_head(*caches, skip="layer1.0", out=tmp_path / "a", progress=False, reuse=True,
                      **FAST).miou == usual.miou


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fusion", ["sum", "concat"])
def test_deterministic_gpu_runs_repeat_bit_for_bit(caches, tmp_path, fusion):
    kwargs = {**FAST, "skip": "layer1.0", "fusion": fusion, "device": "cuda",
              "deterministic": True, "progress": False}
    a = train_head(*caches, out=tmp_path / "a", **kwargs)
    b = train_head(*caches, out=tmp_path / "b", **kwargs)
    assert a.device.startswith("cuda") and a.versions["deterministic_algorithms"]
    np.testing.assert_array_equal(matrix(a), matrix(b))
    assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
    wa = torch.load(tmp_path / "a" / runs.CHECKPOINT, weights_only=True)["head"]
    wb = torch.load(tmp_path / "b" / runs.CHECKPOINT, weights_only=True)["head"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.are_deterministic_algorithms_enabled()
    # without the setting a GPU run trains as usual (interpolate and NLLLoss), to the same losses
    usual = train_head(*caches, out=tmp_path / "u", **{**kwargs, "deterministic": False})
    np.testing.assert_allclose([h["loss"] for h in usual.history],
                               [h["loss"] for h in a.history], rtol=1e-2)


def test_a_batch_larger_than_the_training_set_is_warned(caches, tmp_path):
    with pytest.warns(featlab.errors.FeatlabWarning, match="batch_size 64 exceeds the 48 "
                                                           "training samples: one optimizer step"):
        train_head(*caches, out=tmp_path / "big", progress=False,
                   **{**FAST, "epochs": 1, "batch_size": 64})


def test_files_of_the_users_in_the_run_folder_are_not_overwritten_without_force(caches,
                                                                               tmp_path):
    from featlab.segment.sweep import sweep

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "log.csv").write_text("my notes\n")
    with pytest.raises(ConfigError, match=r"mine has log.csv but no run.json or checkpoint.pt"):
        train_head(*caches, epochs=1, out=mine, progress=False)
    assert (mine / "log.csv").read_text() == "my notes\n"
    (mine / "predictors.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"mine has predictors.json but no sweep.json"):
        sweep(*caches, ["layer1.0"], seeds=[0], out=mine, epochs=1, progress=False)
    assert sorted(p.name for p in mine.iterdir()) == ["log.csv", "predictors.json"]
    result = train_head(*caches, epochs=1, out=mine, progress=False, force=True)
    assert result.epochs_done == 1 and (mine / "log.csv").read_text().startswith("epoch,")


def test_a_preload_that_would_not_fit_in_memory_reads_per_batch(caches, monkeypatch):
    from featlab import allocator
    from featlab.segment import sources

    cache = featlab.open_cache(caches[0])
    need = cache["layer1.1"].nbytes + cache.labels.nbytes
    monkeypatch.setattr(allocator, "available_memory", lambda: need)  # 0.8 x: too little
    with pytest.warns(featlab.errors.FeatlabWarning, match="reading per batch instead"):
        src = sources.CacheSource(cache, ["layer1.1"])
    assert not src.preload
    monkeypatch.setattr(allocator, "available_memory", lambda: 2 * need)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three ranks on this node: 3 copies
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.warns(featlab.errors.FeatlabWarning, match="shared by 3 process"):
        assert not sources.CacheSource(cache, ["layer1.1"]).preload
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    loaded = sources.CacheSource(cache, ["layer1.1"])
    assert loaded.preload and torch.equal(loaded.get([3], "cpu")[0]["layer1.1"],
                                          src.get([3], "cpu")[0]["layer1.1"])


def test_a_shared_preload_reads_each_array_once_and_drops_the_most_recent_first(caches, reads,
                                                                              tmp_path):
    from featlab.segment.sources import Preloads

    train, val = (featlab.open_cache(c) for c in caches)
    last = train.point_names[-1]
    size = {p: train[p].nbytes for p in train.point_names}
    labels = train.labels.nbytes
    cycle = [["layer1.0"], ["conv1"], ["bn1"], ["relu"]]  # a sweep's skip points, seed-major
    store = Preloads(budget=None)
    for _ in range(2):
        for skip in cycle:
            with store.run():
                feats, y = store.take(train, [last, *skip])
    assert len(reads) == 6 and store.bytes_read == sum(size.values()) + labels  # each once
    np.testing.assert_array_equal(feats["relu"].numpy(), train["relu"][:])
    np.testing.assert_array_equal(y.numpy(), train.labels[:])
    # a cache written again at the same path is read again
    copy = featlab.open_cache(shutil.copy(caches[0], tmp_path / "train.h5"))
    with store.run():
        store.take(copy, [last])
    stamp = copy.path.stat().st_mtime_ns + 10**9
    os.utime(copy.path, ns=(stamp, stamp))
    del reads[:]
    with store.run():
        store.take(copy, [last])
    assert sorted(reads) == [("train", "labels"), ("train", "points/layer1.1")]
    # room for the last point, the labels and two skip points: in a cycle, dropping the most
    # recently used array keeps one for the next round (LRU would keep none)
    store, kept = Preloads(budget=size[last] + labels + 2 * size["conv1"]), []
    for _ in range(2):
        for skip in cycle:
            before = store.bytes_read
            with store.run():
                store.take(train, [last, *skip])
            kept.append(store.bytes_read == before)
    assert kept == [False] * 4 + [True, False, False, True]
    # what a run uses is never dropped for another array of the same run
    store = Preloads(budget=size[last] + labels + size["conv1"] + val[last].nbytes
                     + val.labels.nbytes + val["conv1"].nbytes)
    with store.run():
        assert store.take(train, [last, "conv1"]) is not None
        with pytest.warns(featlab.errors.FeatlabWarning, match=r"needs .* more \(.* held for "
                                                                r"this run\)"):
            assert store.take(val, [last, "relu", "conv1"]) is None
        assert store.take(val, [last, "conv1"]) is not None
    del reads[:]
    with store.run():  # a new run: now the first run's arrays may go
        assert store.take(val, [last, "relu"]) is not None
    assert reads == [("val", "points/relu")] and store.held_bytes <= store.budget
