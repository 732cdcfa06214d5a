"""What every result records about the run that made it, and whether it shows progress.

Shared by pretraining, analyses and head training so that each result carries the same
provenance (R-9.2) and every progress bar obeys the same switch (``--quiet`` sets
``FEATLAB_PROGRESS=0``).

Examples:
    >>> import torch
    >>> made = run_versions(torch.device("cpu"))
    >>> made["device"], made["command"], sorted(made)[:3]  # command: set by the CLI
    ('cpu', None, ['command', 'cudnn_benchmark', 'cudnn_deterministic'])
    >>> progress_enabled(False)
    False
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # imported where used: the CLI records its command line also in processes
    import torch   # that never load torch (featlab inspect)

__all__ = ["run_versions", "progress_enabled", "deterministic_algorithms", "source_commit",
           "command_line"]

#: The ``featlab ...`` command this process runs (set by the CLI; None from Python).
_COMMAND: str | None = None

# cuBLAS needs a fixed workspace to give the same sums every time (CUDA >= 10.2); read when
# the process first uses cuBLAS, so set before any CUDA matrix product
CUBLAS_WORKSPACE_CONFIG = ":4096:8"


def run_versions(device: torch.device | str = "cpu") -> dict:
    """Versions and settings a result should record (R-9.2), for a run on ``device``."""
    import torch
    import torchvision

    import featlab

    device = torch.device(device)
    info = {"featlab": featlab.__version__, "git": source_commit(),
            "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "numpy": np.__version__, "python": platform.python_version(),
            "device": str(device), "threads": torch.get_num_threads(),
            "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "command": _COMMAND}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def command_line(argv: list[str] | None) -> None:
    """Record the ``featlab`` command this process runs (``None``: none), for
    :func:`run_versions`: a result made from the command line says how to make it again."""
    import shlex

    global _COMMAND
    _COMMAND = None if argv is None else shlex.join(["featlab", *argv])


@functools.lru_cache(maxsize=1)
def source_commit() -> str | None:
    """The commit of featlab's own source tree, ``+dirty`` when its tracked files differ from
    it; None when featlab is not run from a git checkout of itself (an installed copy inside
    some other project's repository is not featlab's commit)."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True,
                                  timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

    top = git("rev-parse", "--show-toplevel")
    if top is None or top.returncode or Path(top.stdout.strip()).resolve() / "featlab" != package:
        return None
    head = git("rev-parse", "HEAD")
    if head is None or head.returncode or not head.stdout.strip():
        return None
    clean = git("diff", "--quiet", "HEAD", "--")
    return head.stdout.strip() + ("" if clean is not None and clean.returncode == 0
                                  else "+dirty")


def progress_enabled(progress: bool) -> bool:
    """Whether to draw a progress bar: asked for, and not switched off by ``FEATLAB_PROGRESS=0``."""
    return progress and os.environ.get("FEATLAB_PROGRESS", "1") != "0"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Within the block: ``torch.use_deterministic_algorithms(True)``, cuDNN's deterministic
    kernels without benchmarking, and ``CUBLAS_WORKSPACE_CONFIG`` set if it is not (it takes
    effect only if cuBLAS has not run in this process yet: in a notebook, set it before the
    first CUDA matrix product). Every switch is restored on exit; ``enabled=False`` changes
    nothing. An operation with no deterministic implementation raises torch's RuntimeError.
    """
    if not enabled:
        yield
        return
    import torch

    cudnn = torch.backends.cudnn
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic,
             cudnn.benchmark)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)
    cudnn.deterministic, cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
