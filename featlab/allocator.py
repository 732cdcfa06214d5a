"""CPU memory of the process: keep freed memory instead of handing it back to the kernel (glibc),
and how much more it may allocate (:func:`available_memory`).

A CPU forward allocates and frees the same large activations batch after batch. glibc serves
every request above its mmap threshold -- which it never raises beyond 32 MiB -- with a fresh
``mmap`` and returns it with ``munmap`` on free, so each batch page-faults its largest
activations back in (resnet18 at 128 px, batch 32: ``conv1``'s output is 33.5 MB; at 512 px,
batch 16, it is 268 MB). On a VM each fault is expensive: the bare forward of
``benchmarks/bench_extract.py`` takes ~600k faults per 512 images and runs 1.1-1.5x faster
without them. This is the cost that jemalloc/tcmalloc preloads (``torch.backends.xeon.run_cpu``)
remove; :func:`keep_freed_memory` removes it with glibc's own ``mallopt``: no ``mmap`` for large
blocks, and free memory at the top of the heap is kept up to :data:`KEEP_BYTES`.

The trade-off is memory: the heap shrinks only past :data:`KEEP_BYTES` of free memory, and
large aligned blocks fragment it for the first few batches, so the peak grows (resnet18
extraction: the same 1.3 GB at 128 px, batch 32; 4.3 instead of 3.2 GB at 512 px, batch 16,
where it ran 1.2-1.6x faster). Memory still does not grow with the number of samples. It is
process-wide and stays on, which is why the ``featlab`` command does it for its own process
and the library never does it behind a user's back; call it once at the top of a CPU script or
notebook to get the same. ``FEATLAB_KEEP_MEMORY=0`` turns it off for the command. Elsewhere
than glibc (macOS, Windows, musl) it does nothing.

Examples:
    >>> import featlab
    >>> featlab.keep_freed_memory()  # doctest: +SKIP
    True
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

__all__ = ["keep_freed_memory", "release_freed_memory", "available_memory", "memory_budget",
           "KEEP_BYTES", "BUDGET_SHARE"]

log = logging.getLogger("featlab")

# free memory kept at the top of the heap before glibc trims it (mallopt takes an int)
KEEP_BYTES = 1 << 30

#: The share of :func:`available_memory` that featlab lets one computation hold: the rest is
#: room for temporaries and for whatever else the machine runs.
BUDGET_SHARE = 0.8

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4


def _glibc():
    """The C library when it is glibc (its ``mallopt`` and ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
    except (OSError, AttributeError):
        return None
    return libc


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the kernel now (glibc's ``malloc_trim(0)``; elsewhere
    nothing). For loops that keep small results between large temporaries: the small blocks
    land in the freed large ones, the next temporary no longer fits there, and the heap grows by
    one temporary per iteration although the data kept is small."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` reuse freed blocks instead of returning them to the kernel.

    Returns:
        True when set (glibc), False where it does not apply.
    """
    libc = _glibc()
    if libc is None:
        return False
    # mallopt returns 1 on success
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    log.debug("keep freed memory (glibc mallopt): %s", "on" if ok else "refused")
    return ok


def available_memory() -> int | None:
    """Bytes this process may still allocate: the machine's ``MemAvailable``, or less where its
    cgroup (a SLURM job, a container) has a memory limit; None where neither can be read.

    On a cluster node ``/proc/meminfo`` describes the whole host: a 64 GB job on a 512 GB node
    sees ~500 GB there. The cgroup's room is its limit minus what it uses, not counting the
    inactive file cache the kernel reclaims before it kills anything (as ``docker stats``).
    """
    found = [v for v in (_meminfo_available(), _cgroup_room()) if v is not None]
    return min(found) if found else None


def memory_budget() -> int | None:
    """Bytes one of featlab's memory-bound computations may hold: :data:`BUDGET_SHARE` of
    :func:`available_memory` (None where that cannot be read). Its users: the default cap of
    CKA on a cache, and the arrays a head's training (or a sweep) preloads."""
    free = available_memory()
    return None if free is None else int(BUDGET_SHARE * free)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room(root: str = "/sys/fs/cgroup", proc: str = "/proc/self/cgroup") -> int | None:
    """Limit minus usage of the tightest memory cgroup above this process (v2 or v1)."""
    try:
        with open(proc) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    rooms: list[int] = []
    for line in lines:
        _, controllers, rel = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: the unified hierarchy
            rooms += _rooms(root, rel, "memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):
            rooms += _rooms(os.path.join(root, "memory"), rel, "memory.limit_in_bytes",
                            "memory.usage_in_bytes", "total_inactive_file")
    return min(rooms) if rooms else None


def _rooms(mount: str, rel: str, limit: str, usage: str, inactive: str) -> list[int]:
    """The room under each limit from the process's cgroup up to the hierarchy's root. Inside
    a container the host's path is not mounted: there the root is the container's cgroup."""
    mount = os.path.normpath(mount)
    path = os.path.normpath(os.path.join(mount, rel.lstrip("/")))
    if not os.path.isdir(path):
        path = mount
    out = []
    while True:
        cap, used = _read_int(os.path.join(path, limit)), _read_int(os.path.join(path, usage))
        if cap is not None and used is not None and cap < 1 << 60:  # else: no limit
            cache = _stat_value(os.path.join(path, "memory.stat"), inactive) or 0
            out.append(max(0, cap - max(0, used - cache)))
        if path == mount or not path.startswith(mount):
            return out
        path = os.path.dirname(path)


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return None if text == "max" else int(text)
    except (OSError, ValueError):
        return None


def _stat_value(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == key:
                    return int(value)
    except (OSError, ValueError):
        pass
    return None
