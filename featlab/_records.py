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
    featlab.errors.ConfigError: Point keys must be among ['x', 'y']; got unknown ['z']. Fix: use the output of to_dict() (a record from another featlab version?).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from featlab.errors import ConfigError

__all__ = ["check_record"]


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
