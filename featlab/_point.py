"""The :class:`SkipPoint` record, apart from :mod:`featlab.points` (which measures points with
torch): reading a cache needs the record, not torch."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from featlab.errors import ConfigError

__all__ = ["SkipPoint"]

_KEYS = ("name", "index", "module", "channels", "size", "stride", "rf_size", "rf_stride",
         "rf_padding")


@dataclass(frozen=True)
class SkipPoint:
    """One skip point of a backbone, measured at one input size.

    Attributes:
        name: user-visible module path, e.g. ``"layer3.1"`` (never an FX node id).
        index: position in execution order among the model's skip points (0-based).
        module: module path to hook (equal to ``name`` for discovered points).
        channels: C of the output.
        size: output (H, W) at the input size used for discovery.
        stride: input pixels per feature cell along H, measured from output sizes.
        rf_size: theoretical receptive field along H (input pixels), None if unknown.
        rf_stride: effective stride (jump) from the graph, None if unknown.
        rf_padding: effective padding (Araujo et al. 2019), None if unknown.
        rf_status: ``"exact"`` or a short reason (global context, unknown op, ...).
        aliases: outer modules returning the same tensor (``"layer1"`` for ``"layer1.1"``);
            accepted by :func:`select_points`, not serialised, not compared.
    """

    name: str
    index: int
    module: str
    channels: int
    size: tuple[int, int]
    stride: int
    rf_size: int | None
    rf_stride: int | None
    rf_padding: int | None
    rf_status: str = "exact"
    aliases: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", tuple(self.size))
        object.__setattr__(self, "aliases", tuple(self.aliases))
        problems = []
        if not (isinstance(self.name, str) and self.name and isinstance(self.module, str)):
            problems.append("`name` and `module` must be non-empty strings")
        if not (isinstance(self.index, int) and self.index >= 0):
            problems.append("`index` must be an int >= 0")
        for key in ("channels", "stride"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) >= 1):
                problems.append(f"`{key}` must be an int >= 1")
        if len(self.size) != 2 or not all(isinstance(s, int) and s >= 1 for s in self.size):
            problems.append("`size` must be two ints >= 1")
        for key in ("rf_size", "rf_stride", "rf_padding"):
            if getattr(self, key) is not None and not isinstance(getattr(self, key), int):
                problems.append(f"`{key}` must be an int or None")
        if problems:
            raise ConfigError(f"SkipPoint fields must be valid; got {self!r}: "
                              f"{'; '.join(problems)}. Fix: build points with skip_points().")

    def to_dict(self) -> dict:
        """The JSON record: exactly the keys name index module channels size stride rf_size
        rf_stride rf_padding (``size`` as a list)."""
        d = {key: getattr(self, key) for key in _KEYS}
        d["size"] = list(self.size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SkipPoint:
        """Inverse of :meth:`to_dict`; also accepts ``rf_status`` and ``aliases``.

        Examples:
            >>> p = SkipPoint("layer1", 0, "layer1", 64, (56, 56), 4, 35, 4, 13)
            >>> SkipPoint.from_dict(p.to_dict()) == p
            True
        """
        valid = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - valid)
        missing = [key for key in _KEYS if key not in d]
        if unknown or missing:
            raise ConfigError(f"SkipPoint records must have the keys {list(_KEYS)} (optionally "
                              f"rf_status, aliases); got unknown {unknown}, missing {missing}. "
                              "Fix: use the output of SkipPoint.to_dict().")
        return cls(**d)
