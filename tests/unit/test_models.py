"""featlab.models: registry, seeded random init, weights resolution, BackboneSpec."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torchvision

import featlab
from featlab import models
from featlab.errors import (
    CheckpointError,
    ConfigError,
    FeatlabWarning,
    InputSizeError,
    UnknownNameError,
    WeightsNotFoundError,
)

CONTRACT = ["vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50", "resnet101", "densenet121",
            "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny",
            "regnet_y_400mf"]


def _params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def no_network(monkeypatch):
    """Fail the test if anything tries to download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"featlab tried to download: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr("urllib.request.urlopen", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder (TORCH_HOME) standing in for ~/.cache/torch."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # undo any torch.hub.set_dir
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    assert models.hub_checkpoint_dir() == folder
    return folder


# ----------------------------------------------------------------------------- registry
def test_registry_lists_the_contract_backbones_and_refuses_duplicates():
    assert set(CONTRACT) <= set(models.list_backbones())
    assert models.list_backbones() == sorted(models.list_backbones())
    with pytest.raises(ValueError, match="resnet18"):
        models.register_backbone("resnet18")(lambda num_classes: torch.nn.Identity())


@pytest.mark.parametrize("name", CONTRACT)
def test_every_backbone_builds_as_the_torchvision_classifier_in_eval_mode(name):
    model, spec = featlab.get_backbone(name, weights="none", num_classes=7)
    try:  # the meta device allocates nothing; regnet's builder computes with tensors
        with torch.device("meta"):
            reference = torchvision.models.get_model(name, weights=None, num_classes=7)
    except NotImplementedError:
        reference = torchvision.models.get_model(name, weights=None, num_classes=7)
    assert type(model) is type(reference)
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in reference.named_parameters()]
    assert not any(m.training for m in model.modules())
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert (spec.name, spec.weights, spec.num_classes, spec.seed) == (name, "none", 7, 0)
    assert model.featlab_spec == spec  # featlab.extract reads the preprocessing from the model


def test_unknown_model_and_weights_suggest_close_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'resnet50'"):
        featlab.get_backbone("resnet5O")
    with pytest.raises(UnknownNameError, match="Did you mean 'imagenet'"):
        featlab.get_backbone("resnet18", weights="imagenett")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        featlab.get_backbone("resnet18", weights="missing/weights.pt")


# ----------------------------------------------------------------------------- random init
def test_random_init_is_a_function_of_the_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(1234)
    before = torch.random.get_rng_state()
    a, _ = featlab.get_backbone("resnet18", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = featlab.get_backbone("resnet18", seed=3)
    c, spec_c = featlab.get_backbone("resnet18", seed=4)
    assert _params_equal(a, b)
    assert not torch.equal(a.conv1.weight, c.conv1.weight)
    assert spec_c.seed == 4
    # the seed is what torchvision's own init would draw after torch.manual_seed(seed)
    torch.manual_seed(3)
    assert _params_equal(a, torchvision.models.resnet18(weights=None))


# ----------------------------------------------------------------------------- spec
def test_spec_round_trips_and_refuses_unknown_keys():
    _, spec = featlab.get_backbone("mobilenet_v2", num_classes=5, seed=2)
    d = spec.to_dict()
    assert d["mean"] == [0.485, 0.456, 0.406] and isinstance(d["std"], list)
    assert models.BackboneSpec.from_dict(d) == spec
    with pytest.raises(ConfigError, match="crop"):
        models.BackboneSpec.from_dict({**d, "crop": 224})
    with pytest.raises(ConfigError, match="num_classes"):
        models.BackboneSpec.from_dict({k: v for k, v in d.items() if k != "num_classes"})


def test_normalize_is_per_channel_affine():
    spec = models.BackboneSpec("resnet18", "none", (0.1, 0.5, 0.9), (0.2, 0.25, 0.5), 224, 10)
    x = torch.rand(2, 3, 5, 4, dtype=torch.float64)
    expected = torch.stack([(x[:, c] - m) / s for c, (m, s) in
                            enumerate(zip((0.1, 0.5, 0.9), (0.2, 0.25, 0.5)))], dim=1)
    torch.testing.assert_close(spec.normalize(x), expected)
    torch.testing.assert_close(spec.normalize(x[0]), expected[0])
    with pytest.raises(InputSizeError, match=r"\[2, 1, 5, 4\]|\(2, 1, 5, 4\)"):
        spec.normalize(torch.rand(2, 1, 5, 4))


# ----------------------------------------------------------------------------- imagenet
def test_missing_imagenet_file_names_file_and_folder_without_downloading(hub, no_network):
    with pytest.raises(WeightsNotFoundError) as info:
        featlab.get_backbone("resnet50", weights="imagenet")
    message = str(info.value)
    expected = os.path.basename(torchvision.models.ResNet50_Weights.DEFAULT.url)
    assert expected == "resnet50-11ad3fa6.pth"
    assert expected in message and str(hub) in message
    assert "get_model('resnet50', weights='DEFAULT')" in message
    assert not hub.exists()  # nothing was created, let alone fetched


def test_imagenet_weights_load_from_the_hub_cache_with_their_preprocessing(hub, no_network):
    source = torchvision.models.resnet18(weights=None)
    hub.mkdir(parents=True)
    file = hub / "resnet18-f37072fd.pth"
    torch.save(source.state_dict(), file)
    # a stand-in file: its sha256 cannot match the prefix in torchvision's file name
    with pytest.warns(FeatlabWarning, match="sha256"):
        model, spec = featlab.get_backbone("resnet18", weights="imagenet")
    assert _params_equal(model, source)
    assert not model.training
    transforms = torchvision.models.ResNet18_Weights.DEFAULT.transforms()
    assert spec.mean == tuple(transforms.mean) == models.IMAGENET_MEAN
    assert spec.std == tuple(transforms.std)
    assert (spec.input_size, spec.num_classes) == (224, 1000)
    assert spec.weights == "imagenet:ResNet18_Weights.IMAGENET1K_V1"
    assert spec.weights_sha256 == models._sha256(file) and len(spec.weights_sha256) == 64


def test_imagenet_refuses_another_head_size(hub):
    with pytest.raises(ConfigError, match="num_classes"):
        featlab.get_backbone("resnet18", weights="imagenet", num_classes=10)


# ----------------------------------------------------------------------------- checkpoint files
def test_checkpoint_path_infers_classes_and_accepts_wrapped_state_dicts(tmp_path):
    source, _ = featlab.get_backbone("resnet18", seed=5, num_classes=6)
    plain = tmp_path / "plain.pt"
    torch.save(source.state_dict(), plain)
    model, spec = featlab.get_backbone("resnet18", weights=str(plain))
    assert _params_equal(model, source) and spec.num_classes == 6
    assert spec.weights == f"file:{plain.resolve()}"
    assert spec.weights_sha256 == models._sha256(plain)
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3},
               wrapped)
    assert _params_equal(featlab.get_backbone("resnet18", weights=wrapped)[0], source)


def test_checkpoint_mismatch_lists_the_keys(tmp_path):
    path = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None, num_classes=3).state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        featlab.get_backbone("resnet18", weights=str(path))
    message = str(info.value)
    assert "unexpected keys" in message and "layer1.2.conv1.weight" in message
    with pytest.raises(CheckpointError, match=r"fc.weight: file \[3, 512\] vs model \[10, 512\]"):
        small = tmp_path / "r18.pt"
        torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(), small)
        featlab.get_backbone("resnet18", weights=str(small), num_classes=10)


class _Payload:
    """A custom class; torch.load(weights_only=True) must refuse to rebuild it."""

    ran = False

    def __setstate__(self, state):  # would run if the pickle were unpickled
        _Payload.ran = True


def test_pickles_with_non_tensor_objects_and_broken_files_are_refused(tmp_path):
    evil = tmp_path / "evil.pt"
    payload = _Payload()
    payload.x = 1  # a non-empty __dict__, so that unpickling would call __setstate__
    torch.save({"fc.weight": torch.zeros(2, 2), "extra": payload}, evil)
    with pytest.raises(CheckpointError, match="weights_only=True.*") as info:
        featlab.get_backbone("resnet18", weights=str(evil))
    assert not _Payload.ran
    assert "_Payload" in str(info.value)  # names the offending object
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot be read"):
        featlab.get_backbone("resnet18", weights=str(broken))
    numbers = tmp_path / "numbers.pt"
    torch.save({"fc.weight": 3}, numbers)
    with pytest.raises(CheckpointError, match="non-tensor"):
        featlab.get_backbone("resnet18", weights=str(numbers))
    with open(tmp_path / "plain.pkl", "wb") as f:  # a plain pickle of a list
        pickle.dump([1, 2], f, protocol=2)
    with pytest.raises(CheckpointError):
        featlab.get_backbone("resnet18", weights=str(tmp_path / "plain.pkl"))


def test_featlab_checkpoint_restores_its_spec_and_checks_the_model(tmp_path):
    source, _ = featlab.get_backbone("resnet18", seed=1, num_classes=4)
    spec = models.BackboneSpec("resnet18", "shapes:abc", (0.3, 0.4, 0.5), (0.2, 0.2, 0.3), 96, 4,
                               None, 1)
    path = tmp_path / "featlab.pt"
    torch.save({"state_dict": source.state_dict(), "spec": spec.to_dict()}, path)
    model, restored = featlab.get_backbone("resnet18", weights=str(path))
    assert _params_equal(model, source)
    assert (restored.mean, restored.std, restored.input_size, restored.num_classes) == (
        spec.mean, spec.std, 96, 4)
    assert restored.weights == f"file:{path.resolve()}"
    with pytest.raises(CheckpointError, match="holds resnet18"):
        featlab.get_backbone("resnet34", weights=str(path))


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("FEATLAB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert models.weights_dir() == tmp_path / "xdg" / "featlab" / "weights"
    monkeypatch.setenv("FEATLAB_CACHE_DIR", str(tmp_path / "mine"))
    assert models.user_cache_dir() == tmp_path / "mine"
    with pytest.raises(WeightsNotFoundError, match="featlab pretrain --model resnet34"):
        featlab.get_backbone("resnet34", weights="shapes")
    # a checkpoint of non-default pretrain settings is named, with the form that loads it
    (tmp_path / "mine" / "weights").mkdir(parents=True)
    torch.save({}, tmp_path / "mine" / "weights" / "resnet34-shapes-0123456789ab.pt")
    with pytest.raises(WeightsNotFoundError, match=r"other pretrain settings: "
                                                   r"shapes:0123456789ab \(`shapes` alone means"):
        featlab.get_backbone("resnet34", weights="shapes")
    with pytest.raises(WeightsNotFoundError, match=r"'shapes:0123456789bb' .* other pretrain "
                                                   r"settings: shapes:0123456789ab "):  # a typo
        featlab.get_backbone("resnet34", weights="shapes:0123456789bb")


def test_densenet_files_with_legacy_key_names_load(hub):
    """torchvision's DenseNet files name keys 'norm.1'; the modules are now called 'norm1'."""
    source = torchvision.models.densenet121(weights=None)
    legacy = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v  # and no BN counters
              for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    hub.mkdir(parents=True)
    torch.save(legacy, hub / models.imagenet_file_name("densenet121"))
    with pytest.warns(FeatlabWarning, match="sha256"):
        model, spec = featlab.get_backbone("densenet121", weights="imagenet")
    assert _params_equal(model, source)
    assert spec.weights == "imagenet:DenseNet121_Weights.IMAGENET1K_V1"
