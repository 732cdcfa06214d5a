"""Backbones by name, their weights, and the preprocessing that belongs to the weights.

``get_backbone(name, weights)`` returns a plain torchvision classifier (eval mode, CPU) and a
:class:`BackboneSpec` saying what the weights are and how inputs must be normalized for them.
Weights are ``"none"`` (seeded random init), ``"imagenet"`` (torchvision's DEFAULT weights, read
from the local torch hub cache only: featlab never downloads), ``"shapes"`` (trained by
``featlab pretrain`` on the embedded data set, see :mod:`featlab.pretrain`) or a checkpoint path.

Examples:
    >>> import torch
    >>> model, spec = get_backbone("resnet18", weights="none", seed=0, num_classes=4)
    >>> spec.weights, spec.num_classes, model.training
    ('none', 4, False)
    >>> model(spec.normalize(torch.rand(1, 3, 64, 64))).shape
    torch.Size([1, 4])
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from featlab._records import check_record
from featlab.errors import (
    CheckpointError,
    ConfigError,
    FeatlabWarning,
    InputSizeError,
    UnknownNameError,
    WeightsNotFoundError,
    did_you_mean,
)

log = logging.getLogger("featlab")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHTS_KINDS = ("none", "imagenet", "shapes")


# ----------------------------------------------------------------------------- spec
@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone's weights are and the preprocessing that belongs to them.

    Attributes:
        name: registered backbone name, e.g. ``"resnet18"``.
        weights: identity of the weights: ``"none"``, ``"imagenet:<torchvision enum>"``,
            ``"file:<absolute path>"`` or ``"shapes:<settings key>"``.
        mean, std: per-channel normalization of ``[0, 1]`` RGB inputs the weights expect.
        input_size: side in pixels the weights were trained at.
        num_classes: outputs of the classifier.
        weights_sha256: sha256 of the weights file (``None`` for random weights).
        seed: seed of the random initialisation (``weights="none"`` only).

    Examples:
        >>> spec = BackboneSpec("resnet18", "none", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 224, 10)
        >>> BackboneSpec.from_dict(spec.to_dict()) == spec
        True
    """

    name: str
    weights: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    num_classes: int
    weights_sha256: str | None = None
    seed: int | None = None

    def __post_init__(self):
        # Coerce lists (from JSON / checkpoints) to tuples so that specs compare and hash.
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError(
                f"`mean` and `std` of BackboneSpec must be 3 values (std > 0); got "
                f"mean={self.mean}, std={self.std}. Fix: give one value per RGB channel."
            )

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Map ``[N, 3, H, W]`` (or ``[3, H, W]``) images in ``[0, 1]`` to ``(x - mean) / std``."""
        if images.ndim not in (3, 4) or images.shape[-3] != 3:
            raise InputSizeError(
                f"`images` must be [N, 3, H, W] or [3, H, W] RGB in [0, 1]; got shape "
                f"{tuple(images.shape)}. Fix: stack RGB images channel-first."
            )
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(3, 1, 1)
        return (images - mean) / std

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> BackboneSpec:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise :class:`ConfigError`."""
        return _from_dict(cls, d)


def _from_dict(cls, d: dict):
    """Build a dataclass from a dict, refusing unknown keys and missing required ones."""
    check_record(cls, d)
    return cls(**d)


# ----------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class _Entry:
    build: Callable[[int], nn.Module]  # num_classes -> randomly initialised model
    imagenet: Callable[[], object] | None  # -> torchvision WeightsEnum member, or None


_REGISTRY: dict[str, _Entry] = {}


def register_backbone(name: str, *, imagenet: Callable[[], object] | None = None):
    """Decorator registering ``build(num_classes) -> nn.Module`` under ``name``.

    Args:
        name: the name users pass to :func:`get_backbone`; must be new.
        imagenet: optional callable returning the torchvision weights enum member whose
            file (from the local hub cache) holds this model's ImageNet weights.

    Examples:
        >>> @register_backbone("tiny_doc_net")
        ... def _tiny(num_classes):
        ...     return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        ...                          nn.Linear(4, num_classes))
        >>> get_backbone("tiny_doc_net", num_classes=2)[1].num_classes
        2
        >>> _ = _REGISTRY.pop("tiny_doc_net")  # keep the doctest free of side effects
    """

    def decorator(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"backbone names must be unique; {name!r} is already registered.")
        _REGISTRY[name] = _Entry(build, imagenet)
        return build

    return decorator


TORCHVISION_BACKBONES = (
    "vgg16", "vgg16_bn", "resnet18", "resnet34", "resnet50", "resnet101", "densenet121",
    "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "convnext_tiny", "regnet_y_400mf",
)
def _register_torchvision(name: str) -> None:
    register_backbone(name, imagenet=lambda: torchvision.models.get_model_weights(name).DEFAULT)(
        lambda num_classes: torchvision.models.get_model(name, weights=None,
                                                         num_classes=num_classes))


for _name in TORCHVISION_BACKBONES:
    _register_torchvision(_name)


def list_backbones() -> list[str]:
    """Registered backbone names, sorted.

    Examples:
        >>> "resnet50" in list_backbones()
        True
    """
    return sorted(_REGISTRY)


def _entry(name: str) -> _Entry:
    if name not in _REGISTRY:
        raise UnknownNameError(
            f"`name` must be a registered backbone; got {name!r}.{did_you_mean(name, _REGISTRY)} "
            f"See `featlab models` for the list."
        )
    return _REGISTRY[name]


# ----------------------------------------------------------------------------- folders
def user_cache_dir() -> Path:
    """featlab's cache folder: ``$FEATLAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/featlab``,
    else ``~/.cache/featlab`` (not created here)."""
    if os.environ.get("FEATLAB_CACHE_DIR"):
        return Path(os.environ["FEATLAB_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "featlab"


def weights_dir() -> Path:
    """Folder of featlab-trained weights (``user_cache_dir() / "weights"``)."""
    return user_cache_dir() / "weights"


def hub_checkpoint_dir() -> Path:
    """Where ImageNet weights are looked for: ``torch.hub.get_dir()/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def shapes_checkpoint_path(name: str, key: str) -> Path:
    """File of the weights ``featlab pretrain`` trains for ``name`` with settings ``key``."""
    return weights_dir() / f"{name}-shapes-{key}.pt"


def imagenet_file_name(name: str) -> str | None:
    """File name of ``name``'s ImageNet weights in the hub cache (from the weights URL)."""
    getter = _entry(name).imagenet
    return None if getter is None else os.path.basename(urlparse(getter().url).path)


def describe_backbone(name: str) -> dict:
    """One row for ``featlab models``: the ImageNet file and which weights are present here."""
    file = imagenet_file_name(name)
    return {
        "name": name,
        "imagenet_file": file,
        "imagenet_local": file is not None and (hub_checkpoint_dir() / file).is_file(),
        "shapes_local": _default_shapes_path(name).is_file(),
    }


def _default_shapes_path(name: str) -> Path:
    # pretrain owns the training settings (and so the default key); imported lazily because
    # pretrain imports this module.
    from featlab import pretrain

    return shapes_checkpoint_path(name, pretrain.settings_key(name, pretrain.PretrainSettings()))


# ----------------------------------------------------------------------------- get_backbone
def get_backbone(
    name: str, weights: str | os.PathLike = "none", *, seed: int = 0, num_classes: int | None = None
) -> tuple[nn.Module, BackboneSpec]:
    """Build a registered backbone with the given weights, in eval mode on the CPU.

    Args:
        name: a name from :func:`list_backbones`.
        weights: ``"none"`` (random init, deterministic for ``seed``; the caller's global RNG
            is left untouched), ``"imagenet"`` (torchvision's DEFAULT weights from
            ``torch.hub.get_dir()/checkpoints``; never downloaded), ``"shapes"`` or
            ``"shapes:<key>"`` (trained by ``featlab pretrain``), or a checkpoint path
            (a state_dict, a dict with ``"state_dict"``/``"model"``, or a featlab checkpoint,
            whose spec is restored).
        seed: seed of the random initialisation (weights ``"none"``).
        num_classes: classifier outputs; ``None`` means 1000 for ``"none"``/``"imagenet"`` and
            what the checkpoint holds otherwise.

    Returns:
        ``(model, spec)``: the plain classifier and its :class:`BackboneSpec`.

    Raises:
        UnknownNameError: unknown backbone or weights name.
        WeightsNotFoundError: the weights file is not on this machine.
        CheckpointError: the file is unreadable, holds non-tensor objects or does not fit.

    Examples:
        >>> model, spec = get_backbone("resnet18")
        >>> spec.mean, spec.input_size, spec.num_classes
        ((0.485, 0.456, 0.406), 224, 1000)
    """
    entry = _entry(name)
    w = os.fspath(weights)
    if w == "none":
        n = 1000 if num_classes is None else num_classes
        spec = BackboneSpec(name, "none", IMAGENET_MEAN, IMAGENET_STD, 224, n, None, seed)
        return _attach(_build(entry, n, seed), spec)
    if w == "imagenet":
        return _attach(*_imagenet(name, entry, num_classes))
    if w == "shapes" or w.startswith("shapes:"):
        path = _default_shapes_path(name) if w == "shapes" else shapes_checkpoint_path(name, w[7:])
        if not path.is_file():
            others = sorted(f"shapes:{p.stem.rsplit('-', 1)[-1]}"
                            for p in path.parent.glob(f"{name}-shapes-*.pt"))
            also = (f" It holds {name} checkpoints of other pretrain settings: "
                    f"{', '.join(others[:4])} (`shapes` alone means the default settings)."
                    if others else "")
            raise WeightsNotFoundError(
                f"weights {w!r} for {name} must be trained first; {path.name} is not in "
                f"{path.parent}.{also} Fix: run `featlab pretrain --model {name}` (the default "
                f"settings take a few minutes on a laptop CPU)"
                f"{', or pass one of those as --weights' if others else ''}."
            )
        model, spec = _load_file(name, entry, path, num_classes)
        key = path.stem.rsplit("-", 1)[-1]
        return _attach(model, dataclasses.replace(spec, weights=f"shapes:{key}"))
    if os.path.isfile(os.path.expanduser(w)):
        return _attach(*_load_file(name, entry, Path(w).expanduser(), num_classes))
    if os.sep in w or "." in w or w.startswith("~"):
        raise WeightsNotFoundError(
            f"`weights` must be none, imagenet, shapes or an existing checkpoint file; got {w!r}, "
            f"which does not exist. Fix: check the path (relative to {os.getcwd()})."
        )
    raise UnknownNameError(
        f"`weights` must be one of {', '.join(WEIGHTS_KINDS)} or a checkpoint path; got {w!r}."
        f"{did_you_mean(w, WEIGHTS_KINDS)}"
    )


def _attach(model: nn.Module, spec: BackboneSpec) -> tuple[nn.Module, BackboneSpec]:
    # the spec rides on the model so that featlab.extract(model, ...) normalizes as the weights
    # expect without the caller passing it again
    model.featlab_spec = spec
    return model, spec


def _build(entry: _Entry, num_classes: int, seed: int) -> nn.Module:
    # fork_rng: the init is a function of `seed` alone and the caller's RNG stream is unchanged.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = entry.build(num_classes)
    return model.eval()


def _imagenet(name: str, entry: _Entry, num_classes: int | None) -> tuple[nn.Module, BackboneSpec]:
    if entry.imagenet is None:
        raise WeightsNotFoundError(
            f"weights 'imagenet' need a backbone with torchvision ImageNet weights; {name} has "
            f"none. Fix: use weights='none', 'shapes' or a checkpoint path."
        )
    enum = entry.imagenet()
    n_imagenet = len(enum.meta["categories"])
    if num_classes not in (None, n_imagenet):
        raise ConfigError(
            f"`num_classes` must be None or {n_imagenet} with ImageNet weights; got {num_classes}. "
            f"Fix: load with num_classes=None and replace the classifier yourself."
        )
    file = imagenet_file_name(name)
    folder = hub_checkpoint_dir()
    path = folder / file
    if not path.is_file():
        raise WeightsNotFoundError(
            f"ImageNet weights for {name} ({enum}) must be in the local torch hub cache; "
            f"{file} is not in {folder}. featlab never downloads. Fix: on a machine with internet "
            f"run `python -c \"import torchvision; torchvision.models.get_model('{name}', "
            f"weights='DEFAULT')\"`, then copy ~/.cache/torch/hub/checkpoints/{file} into {folder} "
            f"(or point TORCH_HOME at a folder whose hub/checkpoints holds it)."
        )
    model = _build(entry, n_imagenet, 0)
    _load_state(model, name, _read_checkpoint(path)[0], path)
    sha = _sha256(path)
    # torchvision names its files <name>-<first hex digits of sha256>.pth; check as it does.
    m = re.search(r"-([a-f0-9]{6,})\.", file)
    if m and not sha.startswith(m.group(1)):
        warnings.warn(
            f"{path} has sha256 {sha[:12]}..., not the {m.group(1)}... its name promises; it may "
            f"be corrupt or not torchvision's file.", FeatlabWarning, stacklevel=3)
    size = enum.transforms().crop_size[0]
    mean, std = tuple(enum.transforms().mean), tuple(enum.transforms().std)
    log.debug("loaded %s ImageNet weights from %s", name, path)
    return model, BackboneSpec(name, f"imagenet:{enum}", mean, std, size, n_imagenet, sha, None)


def _fix_densenet_keys(state: dict) -> dict:
    # Old torchvision DenseNet files name keys 'norm.1' where the modules are now 'norm1'
    # (the same rewrite torchvision.models.densenet._load_state_dict applies).
    pattern = re.compile(r"^(.*denselayer\d+\.(?:norm|relu|conv))\."
                         r"((?:[12])\.(?:weight|bias|running_mean|running_var))$")
    fixed = {}
    for key, value in state.items():
        m = pattern.match(key)
        fixed[m.group(1) + m.group(2) if m else key] = value
    return fixed


def _load_file(name: str, entry: _Entry, path: Path, num_classes: int | None
               ) -> tuple[nn.Module, BackboneSpec]:
    path = path.resolve()
    state, saved_spec = _read_checkpoint(path)
    if saved_spec is not None and saved_spec.name != name:
        raise CheckpointError(
            f"checkpoint {path} must hold weights of {name}; it holds {saved_spec.name}. "
            f"Fix: call get_backbone({saved_spec.name!r}, {str(path)!r})."
        )
    if num_classes is None:
        num_classes = saved_spec.num_classes if saved_spec else _infer_num_classes(name, state)
    model = _build(entry, num_classes, 0)
    _load_state(model, name, state, path)
    sha = _sha256(path)
    if saved_spec is not None:
        spec = dataclasses.replace(saved_spec, weights=f"file:{path}", weights_sha256=sha)
    else:
        spec = BackboneSpec(name, f"file:{path}", IMAGENET_MEAN, IMAGENET_STD, 224, num_classes,
                            sha, None)
        log.info("%s has no featlab spec; assuming ImageNet mean/std and 224 px", path)
    return model, spec


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], BackboneSpec | None]:
    """Tensors of a checkpoint file (+ its featlab spec if it has one); never runs pickled code."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        if found is None:  # not a pickle of anything: truncated, corrupt, another format
            detail = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
            raise CheckpointError(
                f"checkpoint {path} must be a file written by torch.save; it cannot be read "
                f"({(detail.group(1) if detail else text)[:200]}). Fix: check the file is complete."
            ) from err
        raise CheckpointError(
            f"checkpoint {path} must hold only tensors and plain containers; it holds other "
            f"objects (e.g. {found.group(1)}). featlab loads with weights_only=True and never runs "
            f"pickled code. Fix: re-save it with torch.save(model.state_dict(), path)."
        ) from err
    except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
        raise CheckpointError(
            f"checkpoint {path} must be a file written by torch.save; it cannot be read "
            f"({type(err).__name__}: {str(err)[:200]}). Fix: check the file is complete."
        ) from err
    spec = None
    if isinstance(obj, dict) and isinstance(obj.get("spec"), dict):
        spec = BackboneSpec.from_dict(obj["spec"])
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)] \
        if isinstance(obj, dict) else None
    if bad is None or bad or not obj:
        what = type(obj).__name__ if bad is None else f"non-tensor entries {bad[:5]}"
        raise CheckpointError(
            f"checkpoint {path} must be a state_dict (names -> tensors), or a dict holding one "
            f"under 'state_dict' or 'model'; got {what or 'an empty dict'}. Fix: save "
            f"model.state_dict()."
        )
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DDP
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj, spec


def _load_state(model: nn.Module, name: str, state: dict, path: Path) -> None:
    """``load_state_dict(strict=True)`` after a check whose error lists the offending keys."""
    if name.startswith("densenet"):
        state = _fix_densenet_keys(state)
    own = model.state_dict()
    # files saved before torch 0.4.1 (e.g. torchvision's DenseNet and VGG-BN) lack this counter
    state = {**{k: torch.zeros_like(v) for k, v in own.items()
                if k.endswith(".num_batches_tracked")}, **state}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {list(state[k].shape)} vs model {list(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (e.g. {', '.join(v[:4])})"
                 for what, v in (("missing keys", missing), ("unexpected keys", unexpected),
                                 ("shape mismatches", shapes)) if v]
        raise CheckpointError(
            f"checkpoint {path} must fit {name}; it has {'; '.join(parts)}. Fix: load it with the "
            f"backbone it was saved from, and num_classes=None to take the file's classifier size."
        )
    model.load_state_dict(state, strict=True)


@functools.lru_cache(maxsize=None)
def _classifier_key(name: str) -> str | None:
    """State-dict key of the last Linear layer's weight."""
    try:  # the meta device allocates nothing, but some builders compute with tensors (regnet)
        with torch.device("meta"):
            model = _REGISTRY[name].build(1000)
    except (NotImplementedError, RuntimeError):
        model = _build(_REGISTRY[name], 1000, 0)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return f"{linears[-1]}.weight" if linears else None


def _infer_num_classes(name: str, state: dict) -> int:
    key = _classifier_key(name)
    if key is None or key not in state:
        return 1000  # the key check in _load_state will report the mismatch
    return int(state[key].shape[0])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
