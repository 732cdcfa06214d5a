"""What every result records about the run that made it, and whether it shows progress.

Shared by pretraining, analyses and head training so that each result carries the same
provenance (R-9.2) and every progress bar obeys the same switch (``--quiet`` sets
``FEATLAB_PROGRESS=0``).

Examples:
    >>> import torch
    >>> sorted(run_versions(torch.device("cpu")))[:3]
    ['cudnn_benchmark', 'cudnn_deterministic', 'featlab']
    >>> progress_enabled(False)
    False
"""

from __future__ import annotations

import os
import platform

import numpy as np
import torch

__all__ = ["run_versions", "progress_enabled"]


def run_versions(device: torch.device | str = "cpu") -> dict:
    """Versions and settings a result should record (R-9.2), for a run on ``device``."""
    import torchvision

    import featlab

    info = {"featlab": featlab.__version__, "torch": str(torch.__version__),
            "torchvision": str(torchvision.__version__), "numpy": np.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark}
    device = torch.device(device)
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def progress_enabled(progress: bool) -> bool:
    """Whether to draw a progress bar: asked for, and not switched off by ``FEATLAB_PROGRESS=0``."""
    return progress and os.environ.get("FEATLAB_PROGRESS", "1") != "0"
