"""The identity of a cache: the settings a resumed extraction must share with the partial file.

Two runs that agree on :class:`ExtractSettings` compute the same rows, so a run may resume a
partial cache only when its settings equal the file's; the first difference is reported with
the command-line flag that sets it. Batch size, device, workers and progress are not part of the
identity: they change how fast rows are computed, not what they are (on a GPU, within floating
point tolerance).

Examples:
    >>> a = ExtractSettings(model={"name": "resnet18"}, model_state="ab", data={"name": "shapes"},
    ...                     ids_sha256="cd", num_samples=4, points=("layer1",),
    ...                     input_size=(64, 64), dtype="float32")
    >>> import dataclasses
    >>> a.difference(dataclasses.replace(a, dtype="float16"))
    ('`--dtype`', 'float32', 'float16')
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from featlab._records import check_record

if TYPE_CHECKING:  # imported where a model is hashed: reading settings needs no torch
    import torch

__all__ = ["ExtractSettings", "ids_fingerprint", "state_fingerprint"]

_DATA_FLAGS = {"name": "--data", "split": "--split", "root": "--root", "size": "--input-size",
               "seed": "--data-seed"}
_MODEL_FLAGS = {"name": "--model", "weights": "--weights", "weights_sha256": "--weights",
                "seed": "--seed"}


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that decides the content of a cache (stored as the ``settings`` attribute).

    Attributes:
        model: ``BackboneSpec.to_dict()`` (name, weights identity and sha256, mean, std, ...).
        model_state: sha256 of the model's ``state_dict`` (catches weights changed in memory).
        data: the data set's ``settings()`` (root made absolute).
        ids_sha256: fingerprint of the stored sample ids (:func:`ids_fingerprint`).
        num_samples: N.
        points: point names, execution order.
        input_size: ``(H, W)`` of the network input.
        dtype: storage dtype of the point arrays.
        max_size: pooling bound, 0 = none.
        limit: the ``limit`` asked for (None = all samples).
        save_images: whether ``/images`` is stored.
        world_size: processes writing it (shards).
        error_stat: the float16 rounding error in ``/stats/abs_error``, ``"bound"`` or
            ``"exact"`` (:mod:`featlab.cache.taps`; ``"exact"`` for float32, which loses nothing,
            and in caches written before the setting existed).
        max_channels: channel bound, 0 = every channel.
        channel_seed: the seed of the channel subsets (:func:`~featlab.cache.plan.channel_subset`;
            0 when no point has more than ``max_channels``).
    """

    model: Mapping[str, Any]
    model_state: str
    data: Mapping[str, Any]
    ids_sha256: str
    num_samples: int
    points: tuple[str, ...]
    input_size: tuple[int, int]
    dtype: str
    max_size: int = 0
    limit: int | None = None
    save_images: bool = False
    world_size: int = 1
    error_stat: str = "exact"
    max_channels: int = 0
    channel_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "points", tuple(self.points))
        object.__setattr__(self, "input_size", tuple(int(v) for v in self.input_size))
        # plain JSON types, so a value read back from the file compares equal to a fresh one
        object.__setattr__(self, "model", json.loads(json.dumps(dict(self.model))))
        object.__setattr__(self, "data", json.loads(json.dumps(dict(self.data))))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["points"], d["input_size"] = list(self.points), list(self.input_size)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ExtractSettings:
        check_record(cls, d, fix="the cache was written by another featlab version; "
                                 "re-extract it")
        return cls(**d)

    def difference(self, now: ExtractSettings) -> tuple[str, str, str] | None:
        """The first setting in which ``now`` differs from ``self``: ``(flag, there, now)``."""
        if self.model != now.model:
            key = next(k for k in sorted(set(self.model) | set(now.model))
                       if self.model.get(k) != now.model.get(k))
            flag = f"`{_MODEL_FLAGS[key]}`" if key in _MODEL_FLAGS else f"the model spec `{key}`"
            return flag, _show(self.model.get(key)), _show(now.model.get(key))
        if self.model_state != now.model_state:
            return ("the model's weights (sha256 of its state_dict)", _show(self.model_state),
                    _show(now.model_state))
        if self.data != now.data:
            key = next(k for k in sorted(set(self.data) | set(now.data))
                       if self.data.get(k) != now.data.get(k))
            flag = f"`{_DATA_FLAGS[key]}`" if key in _DATA_FLAGS else f"the data set option `{key}`"
            return flag, _show(self.data.get(key)), _show(now.data.get(key))
        for name, flag in (("points", "`--points`"), ("input_size", "`--input-size`"),
                           ("dtype", "`--dtype`"), ("max_size", "`--max-size`"),
                           ("limit", "`--limit`"), ("save_images", "`--save-images`"),
                           ("error_stat", "`--error-stat`"),
                           ("max_channels", "`--max-channels`"),
                           ("channel_seed", "`--channel-seed`"),
                           ("world_size", "the number of processes (torchrun world size)"),
                           ("num_samples", "the number of samples"),
                           ("ids_sha256", "the data set's sample ids (their sha256)")):
            there, here = getattr(self, name), getattr(now, name)
            if there != here:
                if name == "points":
                    there, here = ",".join(there), ",".join(here)
                return flag, _show(there), _show(here)
        return None


def _show(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."  # a sha256
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def ids_fingerprint(ids: Sequence[str]) -> str:
    """sha256 of the newline-joined sample ids (what joins between caches compare).

    Examples:
        >>> ids_fingerprint(["a", "b"])[:12]
        '7e18f737311b'
    """
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


def state_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``model.state_dict()``.

    Examples:
        >>> import torch
        >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        >>> b.load_state_dict(a.state_dict())
        <All keys matched successfully>
        >>> state_fingerprint(a) == state_fingerprint(b)
        True
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def absolute_root(data: Mapping[str, Any]) -> dict:
    """``data`` with its ``root`` made absolute (the same folder named from another cwd)."""
    out = dict(data)
    if out.get("root") is not None:
        out["root"] = os.path.abspath(os.fspath(out["root"]))
    return out
