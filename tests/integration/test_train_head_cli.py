"""`featlab train-head`: outputs, refusals, and a SIGKILLed run that resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import featlab
import featlab.testing as ft
from featlab.cli import main
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "FEATLAB_PROGRESS": "0"}


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trainhead")
    for split, n in (("train", 48), ("val", 16)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(ft.TinyResNet(), ds, "all", tmp / f"{split}.h5", spec=SPEC,
                        batch_size=16, dtype="float32", num_workers=0, progress=False)
    return tmp / "train.h5", tmp / "val.h5"


def args(caches, *extra):
    return ["train-head", "--train", str(caches[0]), "--val", str(caches[1]), "--epochs", "2",
            "--batch-size", "8", "--lr", "0.01", "-q", *extra]


def test_train_head_writes_a_run_folder_next_to_the_cache_and_never_overwrites_it(
        caches, capsys):
    assert main(args(caches, "--skip", "layer1.0", "--fusion", "concat")) == 0
    out = capsys.readouterr().out
    assert "skip layer1.0 (concat): val mIoU" in out and "epoch" in out
    folder = caches[0].parent / "heads" / "skip-layer1.0-concat-seed0"
    assert {p.name for p in folder.iterdir()} >= {"run.json", "log.csv", "log.json",
                                                  "checkpoint.pt", "val_confusion.npz"}
    record = json.loads((folder / "run.json").read_text())
    assert record["settings"]["fusion"] == "concat" and record["finished"]
    stamp = (folder / "run.json").stat().st_mtime_ns
    # the same command again: the finished run's result, nothing trained or written
    assert main(args(caches, "--skip", "layer1.0", "--fusion", "concat")) == 0
    assert capsys.readouterr().out == out and (folder / "run.json").stat().st_mtime_ns == stamp
    # other settings into that folder: refused, naming the setting
    assert main(args(caches, "--skip", "layer1.0", "--fusion", "concat", "--out", str(folder),
                     "--lr", "0.1")) == 2
    err = capsys.readouterr().err
    assert "its lr is 0.01, not 0.1" in err and "--force" in err
    assert main(args(caches, "--skip", "layer1.0", "--fusion", "concat", "--force",
                     "--json")) == 0
    assert json.loads(capsys.readouterr().out)["miou"] == pytest.approx(record["miou"])
    assert main(args(caches, "--skip", "layer1.0", "--fusion", "concat", "--deterministic",
                     "--force", "--json")) == 0
    det = json.loads(capsys.readouterr().out)
    assert det["settings"]["deterministic"] and det["versions"]["deterministic_algorithms"]
    assert main(args(caches, "--skip", "layer7")) == 2
    assert "layer1.0" in capsys.readouterr().err  # the message lists the stored points


@pytest.mark.slow
def test_sigkilled_run_resumes_and_ends_equal_to_an_uninterrupted_one(caches, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' arithmetic
    try:
        assert main(args(caches, "--skip", "relu", "--epochs", "12", "--out",
                         str(tmp_path / "ref"))) == 0
    finally:
        torch.set_num_threads(threads)
    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "featlab", *args(caches, "--skip", "relu", "--epochs", "12",
                                                  "--out", str(killed))]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        log = killed / "log.json"
        if log.exists() and len(json.loads(log.read_text() or "[]")) >= 2:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "run.json").exists(), "finished before the kill: nothing to resume"
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a = json.loads((tmp_path / "ref" / "run.json").read_text())
    b = json.loads((killed / "run.json").read_text())
    assert b["resumed_from_epoch"] >= 2
    np.testing.assert_array_equal(a["metrics"]["matrix"], b["metrics"]["matrix"])
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    wa = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=True)["head"]
    wb = torch.load(killed / "checkpoint.pt", weights_only=True)["head"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_finetune_rebuilds_backbone_and_images_from_the_cache_records(tmp_path, capsys):
    model, spec = featlab.get_backbone("resnet18")  # weights "none", seed 0: rebuilt exactly
    for split, n in (("train", 16), ("val", 8)):
        ds = featlab.load_dataset("shapes", split=split, size=32, length=n)
        featlab.extract(model, ds, "stages", tmp_path / f"{split}.h5", spec=spec,
                        batch_size=8, dtype="float32", num_workers=0, progress=False)
    assert main(["train-head", "--train", str(tmp_path / "train.h5"), "--val",
                 str(tmp_path / "val.h5"), "--skip", "layer2.1", "--finetune", "--epochs", "1",
                 "--batch-size", "8", "-q", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["settings"]["finetune"] and record["metrics"]["matrix"]
    ckpt = torch.load(tmp_path / "heads" / "skip-layer2.1-sum-ft-seed0" / "checkpoint.pt",
                      map_location="cpu", weights_only=True)  # saved from the GPU if there is one
    moved = [k for k, v in model.state_dict().items() if not torch.equal(ckpt["backbone"][k], v)]
    assert "layer1.0.bn1.running_mean" in moved and "conv1.weight" in moved


@pytest.mark.parametrize("argv, message", [
    (["--fusion", "mean"], "featlab train-head: error: argument --fusion: invalid choice: 'mean' "
                           "(choose from 'sum', 'concat'). See `featlab train-head --help`."),
    # argparse used to read -1e-3 as an option ("expected one argument")
    (["--lr", "-1e-3"], "featlab train-head: error: HeadSettings need positive epochs, "
                        "batch_size and mid_channels, a finite lr > 0"),
    # named by the command, with the flag it has; and no abbreviations (--epoch is not --epochs)
    (["--num-epochs", "2"], "featlab train-head: error: unrecognized arguments: --num-epochs 2 "
                            "(did you mean --epochs?). See `featlab train-head --help`."),
    (["--epoch", "2"], "featlab train-head: error: unrecognized arguments: --epoch 2 (did you "
                       "mean --epochs?)."),
    # other tools' habit: here re-running the same command resumes
    (["--resume"], "featlab train-head: error: unrecognized arguments: --resume (none is "
                   "needed: the same command without it resumes where a stopped run left off)."),
])
def test_argument_errors_are_one_line(caches, capsys, cli_state, argv, message):
    try:
        code = main(["train-head", "--train", str(caches[0]), "--val", str(caches[1]), *argv])
    except SystemExit as exited:  # argparse's own errors
        code = exited.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith(message), err
