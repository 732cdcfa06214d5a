"""featlab.pretrain: a tiny real training run, its cache, its checkpoint and what it restores."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections import Counter

import pytest
import torch

import featlab
from featlab import models, pretrain
from featlab.errors import ConfigError, InputSizeError, UnknownNameError

TINY = dict(steps=8, batch_size=8, image_size=32, val_images=32, eval_every=4, warmup_steps=2)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FEATLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("FEATLAB_PROGRESS", "0")
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny resnet18 run shared by the tests below (it is the expensive part)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEATLAB_CACHE_DIR", str(folder))
        torch.manual_seed(99)
        before, threads = torch.random.get_rng_state(), torch.get_num_threads()
        result = pretrain.pretrain("resnet18", progress=False, num_workers=1, threads=1, **TINY)
        untouched = torch.equal(before, torch.random.get_rng_state()) and (
            threads == torch.get_num_threads())
    return folder, result, untouched


def _not_again(*args, **kwargs):
    raise AssertionError("pretrain trained although a checkpoint with these settings exists")


def test_tiny_run_writes_its_checkpoint_under_the_cache(tiny_run):
    folder, result, untouched = tiny_run
    settings = pretrain.PretrainSettings(**TINY)
    key = pretrain.settings_key("resnet18", settings)
    expected = folder / "weights" / f"resnet18-shapes-{key}.pt"
    assert result.checkpoint == str(expected) and expected.is_file()
    assert not list(expected.parent.glob("*.partial"))  # the temporary file was renamed
    assert (result.key, result.steps, result.reused, result.device) == (key, 8, False, "cpu")
    assert [h["step"] for h in result.history] == [4, 8]
    assert result.accuracy == result.history[-1]["val_accuracy"]
    assert untouched  # the caller's RNG state and torch thread count
    ckpt = torch.load(expected, weights_only=True)
    assert {"state_dict", "spec", "result", "versions", "settings"} <= set(ckpt)
    assert ckpt["versions"]["torch"] == str(torch.__version__)
    assert ckpt["versions"]["featlab"] == featlab.__version__
    assert ckpt["versions"]["threads"] == 1  # what the run used, not the caller's setting
    assert pretrain.PretrainSettings.from_dict(ckpt["settings"]) == settings


def test_reported_accuracy_and_baselines_match_an_independent_evaluation(tiny_run, monkeypatch):
    folder, result, _ = tiny_run
    monkeypatch.setenv("FEATLAB_CACHE_DIR", str(folder))
    settings = pretrain.PretrainSettings(**TINY)
    model, spec = featlab.get_backbone("resnet18", weights=f"shapes:{result.key}")
    val = pretrain.ObjectCrops("val", settings, settings.val_images)
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.inference_mode():
        predicted = model(spec.normalize(x)).argmax(1)
    assert result.accuracy == pytest.approx(float((predicted == y).float().mean()), abs=1e-4)
    train = pretrain.ObjectCrops("train", settings, settings.steps * settings.batch_size, True)
    counts = Counter(train[i][1] for i in range(len(train)))
    majority = max(sorted(counts), key=counts.get)  # ties: the lowest class, like argmax
    assert result.prior == pytest.approx(float((y == majority).float().mean()), abs=1e-4)
    assert result.chance == pytest.approx(1 / 8, abs=1e-4)
    assert 0 < result.images_per_second and 0 < result.seconds


def test_second_call_reuses_and_other_settings_make_a_new_key(tiny_run, monkeypatch, caplog):
    folder, result, _ = tiny_run
    monkeypatch.setenv("FEATLAB_CACHE_DIR", str(folder))
    monkeypatch.setattr(pretrain, "_train", _not_again)
    with caplog.at_level(logging.INFO, logger="featlab"):
        again = pretrain.pretrain("resnet18", progress=False, **TINY)
    assert again.reused and "reusing" in caplog.text
    assert dataclasses.replace(again, reused=False) == result
    changed = {**TINY, "lr": 1e-3}
    assert pretrain.settings_key("resnet18", pretrain.PretrainSettings(**changed)) != result.key
    assert pretrain.settings_key("resnet34", pretrain.PretrainSettings(**TINY)) != result.key
    with pytest.raises(AssertionError, match="trained although"):
        pretrain.pretrain("resnet18", progress=False, **changed)
    with pytest.raises(AssertionError, match="trained although"):
        pretrain.pretrain("resnet18", progress=False, force=True, **TINY)


def test_get_backbone_restores_the_spec_from_shapes_and_from_the_path(tiny_run, monkeypatch):
    folder, result, _ = tiny_run
    monkeypatch.setenv("FEATLAB_CACHE_DIR", str(folder))
    saved = models.BackboneSpec.from_dict(torch.load(result.checkpoint, weights_only=True)["spec"])
    assert saved.num_classes == 9 and saved.input_size == 128 and saved.mean != models.IMAGENET_MEAN
    # "shapes" means the default settings: put the tiny checkpoint where those would be
    default = pretrain.checkpoint_path("resnet18", pretrain.PretrainSettings())
    default.write_bytes(open(result.checkpoint, "rb").read())
    for weights, identity in [("shapes", f"shapes:{default.stem.rsplit('-', 1)[1]}"),
                              (result.checkpoint, f"file:{result.checkpoint}")]:
        model, spec = featlab.get_backbone("resnet18", weights=weights)
        assert (spec.mean, spec.std, spec.num_classes, spec.input_size) == (
            saved.mean, saved.std, saved.num_classes, saved.input_size)
        assert spec.weights == identity and spec.weights_sha256 == models._sha256(default)
        assert model.fc.out_features == 9 and not model.training


def test_training_is_deterministic_on_cpu(cache):
    small = dict(steps=3, batch_size=4, image_size=32, val_images=8, eval_every=3)
    first = pretrain.pretrain("resnet18", progress=False, num_workers=0, threads=1, **small)
    state = torch.load(first.checkpoint, weights_only=True)["state_dict"]
    second = pretrain.pretrain("resnet18", progress=False, num_workers=1, threads=1, force=True,
                               **small)
    again = torch.load(second.checkpoint, weights_only=True)["state_dict"]
    assert all(torch.equal(state[k], again[k]) for k in state)
    assert first.history[-1]["loss"] == second.history[-1]["loss"]


@pytest.mark.slow
def test_another_family_trains_and_loads(cache):
    result = pretrain.pretrain("mobilenet_v3_large", progress=False, num_workers=0, threads=1,
                               steps=2,
                               batch_size=4, image_size=32, val_images=4, eval_every=2)
    model, spec = featlab.get_backbone("mobilenet_v3_large", weights=f"shapes:{result.key}")
    assert spec.num_classes == 9 and model.classifier[-1].out_features == 9
    assert 0 <= result.accuracy <= 1


def test_bad_arguments_get_typed_errors(cache):
    with pytest.raises(UnknownNameError, match="Did you mean 'shapes'"):
        pretrain.pretrain("resnet18", data="shape")
    with pytest.raises(UnknownNameError, match="resnet18"):
        pretrain.pretrain("resnet19")
    with pytest.raises(ConfigError, match="Did you mean 'steps'"):
        pretrain.pretrain("resnet18", step=3)
    with pytest.raises(ConfigError, match=r"`threads` must be an int >= 1; got 0"):
        pretrain.pretrain("resnet18", threads=0)
    with pytest.raises(ConfigError, match="cdua"):
        pretrain.pretrain("resnet18", device="cdua", steps=2, batch_size=2)
    with pytest.raises(ConfigError, match="batch_size=0"):
        pretrain.PretrainSettings(batch_size=0)
    with pytest.raises(ConfigError, match="momentum"):
        pretrain.PretrainSettings.from_dict({**pretrain.PretrainSettings().to_dict(),
                                             "momentum": 0.9})


def test_crops_too_small_for_the_network_are_refused_before_training(cache):
    with pytest.raises(InputSizeError, match=r"`image_size` of pretrain must be at least 32 px "
                                             r"for vgg16; got 16\. Fix: --image-size 32"):
        pretrain.pretrain("vgg16", image_size=16, steps=2, batch_size=2, val_images=4,
                          progress=False, num_workers=0)
    assert not list(cache.glob("**/*.pt"))


def test_the_command_says_how_to_use_what_it_trained(cache, capsys, cli_state):
    from featlab.cli import main

    argv = ["pretrain", "--steps", "2", "--batch-size", "4", "--image-size", "32", "-q",
            "--threads", "1"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main([*argv, "--json"]) == 0  # reused: the record of the training
    assert json.loads(capsys.readouterr().out)["versions"]["threads"] == 1
    key = pretrain.settings_key("resnet18", pretrain.PretrainSettings(steps=2, batch_size=4,
                                                                      image_size=32))
    assert f"use them with --weights shapes:{key}\n" in first and ", trained in" in first
    assert main(argv) == 0  # again: the same checkpoint, said to be reused
    assert ", reused (trained in" in capsys.readouterr().out
    featlab.get_backbone("resnet18", weights=f"shapes:{key}")  # what it said loads
