"""Keep freed CPU memory in the process instead of handing it back to the kernel (glibc).

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
import sys

__all__ = ["keep_freed_memory", "KEEP_BYTES"]

log = logging.getLogger("featlab")

# free memory kept at the top of the heap before glibc trims it (mallopt takes an int)
KEEP_BYTES = 1 << 30

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc's ``malloc`` reuse freed blocks instead of returning them to the kernel.

    Returns:
        True when set (glibc), False where it does not apply.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl does not)
    except (OSError, AttributeError):
        return False
    # mallopt returns 1 on success
    ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1
    log.debug("keep freed memory (glibc mallopt): %s", "on" if ok else "refused")
    return ok
