"""The featlab error tree.

Every error featlab raises for bad user input derives from :class:`FeatlabError` *and* from the
builtin a caller would naturally catch (``ValueError``, ``FileNotFoundError``, ...). Messages
follow one shape: what was expected, what arrived, and how to fix it. The CLI prints
``str(error)`` on one line and exits with code 2.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FeatlabError(Exception):
    """Root of every error featlab raises on purpose."""


class ConfigError(FeatlabError, ValueError):
    """A setting or argument has an invalid value or an unknown key."""


class UnknownNameError(FeatlabError, ValueError):
    """A name (model, weights, data set, point, ...) is not one featlab knows."""


class SkipPointNotFoundError(UnknownNameError):
    """A point name or pattern matches no skip point / module of the model."""


class DatasetFormatError(ConfigError):
    """A data set file exists but its content is not what its layout promises (e.g. mask values
    outside the class range, a colour mask where class indices were expected)."""


class InputSizeError(FeatlabError, ValueError):
    """The input is too small (or malformed) for the network (``minimum``: the smallest side
    that works, where it was measured)."""

    minimum: int | None = None


class CheckpointError(FeatlabError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class WeightsNotFoundError(FeatlabError, FileNotFoundError):
    """Weights are not available locally (featlab never downloads)."""


class DatasetNotFoundError(FeatlabError, FileNotFoundError):
    """A data set folder or file is missing; the message shows the expected layout."""


class GraphTraceError(FeatlabError, RuntimeError):
    """The model cannot be traced with ``torch.fx`` (data-dependent control flow, ...)."""


class ReusedModuleError(FeatlabError, RuntimeError):
    """A captured module ran more than once in one forward pass."""


class SkipPointNotFiredError(FeatlabError, RuntimeError):
    """A captured module did not run during the forward pass."""


class ModelModeError(FeatlabError, RuntimeError):
    """A module was in training mode where featlab requires eval mode."""


class TrainingDivergedError(FeatlabError, RuntimeError):
    """A head's training loss stopped being finite (NaN or inf): its weights are lost."""


class CacheError(FeatlabError, OSError):
    """An activation cache is missing, incomplete, corrupt or made with other settings."""


def did_you_mean(name: str, candidates: Iterable[str], n: int = 3) -> str:
    """Return a hint such as ``" Did you mean 'layer4', 'layer3'?"`` or ``""``.

    Examples:
        >>> did_you_mean("layr4", ["layer3", "layer4", "fc"])
        " Did you mean 'layer4', 'layer3'?"
    """
    matches = difflib.get_close_matches(name, list(candidates), n=n, cutoff=0.5)
    if not matches:
        return ""
    return " Did you mean " + ", ".join(repr(m) for m in matches) + "?"


class FeatlabWarning(UserWarning):
    """A result is usable but something about it deserves attention."""
