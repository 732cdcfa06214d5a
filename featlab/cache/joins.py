"""Joining caches row by row: check that two caches hold the same samples (R-5.3); whether two
caches come from the same backbone; and whether a record's cache identity is the same cache as
another's."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from featlab.cache._reading import ids_sha256
from featlab.errors import CacheError

if TYPE_CHECKING:
    from featlab.cache.reader import CacheReader

__all__ = ["check_same_samples", "identity_difference", "backbone_difference"]


def identity_difference(then: dict, now: dict) -> str | None:
    """The first key in which two cache identities (:meth:`CacheReader.identity`, e.g. one
    recorded in a run and one of a cache opened now) differ, or None when they name the same
    cache. The path is not compared: the same files moved are the same cache. Nor is a key one
    of them lacks: a record written before featlab recorded it.

    Examples:
        >>> a = {"path": "a/train.h5", "ids_sha256": "1f", "input_size": [32, 32]}
        >>> identity_difference(a, {**a, "path": "b/train.h5", "input_size": (32, 32)}) is None
        True
        >>> identity_difference(a, {**a, "ids_sha256": "2e"})
        'ids_sha256'
        >>> identity_difference(a, {**a, "max_channels": 0}) is None  # not recorded then
        True
    """
    return next((key for key in sorted((set(then) & set(now)) - {"path"})
                 if json.dumps(then.get(key)) != json.dumps(now.get(key))), None)  # tuples=lists


#: How :func:`backbone_difference` names a difference in the hashed model state.
STATE = "weights (sha256 of the model state)"


def backbone_difference(a: CacheReader, b: CacheReader) -> tuple[str, Any, Any] | None:
    """The first way in which two caches' backbones differ, ``(what, in a, in b)``, or None.

    Compared: the model record (name, weights, their file's sha256, normalisation, ...) and the
    sha256 of the state the features were computed with (``model_state``). Where both caches
    record that hash it stands for the weights: the same state loaded from another path, or
    from a checkpoint file with other metadata (a retrained ``shapes:KEY``), is the same
    backbone, so ``weights`` and ``weights_sha256`` are not compared then.

    Examples:
        >>> class C:
        ...     def __init__(self, weights, state):
        ...         self.model = {"name": "resnet18", "weights": weights}
        ...         self.settings = {"model_state": state}
        >>> backbone_difference(C("file:/a/r18.pt", "9f"), C("file:/b/r18.pt", "9f")) is None
        True
        >>> backbone_difference(C("file:/a/r18.pt", "9f"), C("file:/a/r18.pt", "2e"))
        ('weights (sha256 of the model state)', '9f', '2e')
    """
    ma, mb = dict(a.model or {}), dict(b.model or {})
    sa, sb = ((c.settings or {}).get("model_state") for c in (a, b))
    if sa and sb:
        for m in (ma, mb):
            m.pop("weights", None)
            m.pop("weights_sha256", None)
    if ma != mb:  # the record first: a name reads better than a hash
        key = identity_difference(ma, mb) or next(
            k for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k))
        return key, ma.get(key), mb.get(key)
    if sa != sb:
        return STATE, sa, sb
    return None


def check_same_samples(a: CacheReader, b: CacheReader) -> None:
    """Raise CacheError unless two caches hold the same samples in the same order (R-5.3).

    Analyses that join caches row by row (CKA across models, probes) call this first. The
    stored fingerprints (``ids_sha256`` of all N ids) are compared first; on a mismatch the
    message names the first position where the ids differ. Equal fingerprints with different
    exposed samples (one cache still being written) are also an error.

    Examples:
        >>> check_same_samples(open_cache("a.h5"), open_cache("b.h5"))  # doctest: +SKIP
    """
    fa, fb = (c.ids_sha256 or ids_sha256(c.all_ids()) for c in (a, b))
    if fa != fb:
        where = _first_difference(a.all_ids(), b.all_ids())
        raise CacheError(f"caches joined row by row must hold the same samples in the same "
                         f"order; {str(a.path)!r} and {str(b.path)!r} differ ({where}; ids "
                         f"sha256 {fa[:12]} vs {fb[:12]}). Fix: extract both from the same data "
                         "set, split and settings, without shuffling.")
    if a.ids != b.ids:
        raise CacheError(f"caches joined row by row must expose the same samples; "
                         f"{str(a.path)!r} has {len(a)} and {str(b.path)!r} {len(b)} of "
                         f"{a.num_samples} written ({_first_difference(a.ids, b.ids)}). Fix: "
                         "wait until both are complete and call cache.refresh().")


def _first_difference(x: list[str], y: list[str]) -> str:
    for i, (u, v) in enumerate(zip(x, y)):
        if u != v:
            return f"first at position {i}: {u!r} vs {v!r}"
    if len(x) != len(y):
        return f"{len(x)} vs {len(y)} samples, equal up to position {min(len(x), len(y))}"
    return "equal ids, but a stored ids_sha256 is wrong; run `featlab verify`"
