"""One check for every ``from_dict``: a record's keys must be its dataclass's fields.

Examples:
    >>> import dataclasses
    >>> @dataclasses.dataclass
    ... class Point:
    ...     x: int
    ...     y: int = 0
    >>> check_record(Point, {"x": 1})
    >>> check_record(Point, {"x": 1, "z": 2})
    Traceback (most recent call last):
    ...
    featlab.errors.ConfigError: Point keys must be among ['x', 'y']; got unknown ['z']. Fix: ...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from featlab.errors import ConfigError, did_you_mean

__all__ = ["check_record", "with_overrides"]


def check_record(cls: type, d: Mapping[str, Any], *,
                 fix: str = "use the output of to_dict() (a record from another featlab "
                            "version?)") -> None:
    """Raise :class:`ConfigError` if ``d`` has keys that are not fields of the dataclass
    ``cls``, or lacks a field without a default."""
    fields = dataclasses.fields(cls)
    names = sorted(f.name for f in fields)
    unknown = sorted(set(d) - set(names))
    missing = [f.name for f in fields if f.name not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if unknown or missing:
        got = f"unknown {unknown}" + (f", missing {missing}" if missing else "")
        raise ConfigError(f"{cls.__name__} keys must be among {names}; got {got}. Fix: {fix}.")


def with_overrides(settings: Any, overrides: Mapping[str, Any], caller: str) -> Any:
    """``dataclasses.replace(settings, **overrides)``, where a keyword that is not a field of
    ``settings`` is a :class:`ConfigError` naming it (``caller``'s keyword options), not
    ``dataclasses``' TypeError about ``__init__``.

    Examples:
        >>> @dataclasses.dataclass
        ... class Recipe:
        ...     epochs: int = 1
        >>> with_overrides(Recipe(), {"epochs": 3}, "train")
        Recipe(epochs=3)
        >>> with_overrides(Recipe(), {"epoch": 3}, "train")
        Traceback (most recent call last):
        ...
        featlab.errors.ConfigError: train's keyword options ... got 'epoch'. Did you mean 'epochs'?
    """
    fields = [f.name for f in dataclasses.fields(settings)]
    for name in overrides:
        if name not in fields:
            raise ConfigError(f"{caller}'s keyword options must be {type(settings).__name__} "
                              f"fields ({', '.join(fields)}); got {name!r}."
                              f"{did_you_mean(name, fields)}")
    return dataclasses.replace(settings, **overrides)
