"""R-4.2: peak memory of an extraction does not grow with the number of samples."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# ~0.29 MB of float16 per sample: 2000 samples held in memory would add ~590 MB to a ~0.4 GB
# process, far beyond the 1.5x allowed; streamed, only a few batches are ever in flight.
SCRIPT = textwrap.dedent("""
    import resource, sys
    import numpy as np, torch
    import featlab
    if sys.argv[3] == "keep":  # as the featlab command does
        assert featlab.keep_freed_memory()
    from torch import nn
    from featlab.cache.writer import extract
    from featlab.data.base import SegmentationDataset
    from featlab.models import BackboneSpec

    class Noise(SegmentationDataset):
        name = "noise"
        def __init__(self, n):
            super().__init__("all", size=48)
            self.classes, self.ids = ("a", "b"), [f"n{i:05d}" for i in range(n)]
        def sample(self, i):
            rng = np.random.default_rng(i)
            return (rng.integers(0, 256, (48, 48, 3), dtype=np.uint8),
                    rng.integers(0, 2, (48, 48), dtype=np.uint8))

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 64, 3, padding=1)
        def forward(self, x):
            return self.conv(x).mean((2, 3))

    n = int(sys.argv[1])
    spec = BackboneSpec("wide", "none", (0.5,) * 3, (0.25,) * 3, 48, 64)
    torch.manual_seed(0)
    r = extract(Wide(), Noise(n), "all", sys.argv[2], spec=spec, batch_size=16,
                num_workers=0, progress=False)
    assert r.written == n
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB on Linux
""")


def peak_rss_kib(n, path, allocator):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(n), str(path), allocator], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split()[-1])


@pytest.mark.slow
@pytest.mark.parametrize("allocator", ["default", "keep"])
def test_peak_rss_for_2000_samples_is_within_1_5x_of_200(tmp_path, allocator):
    """Also with freed memory kept for reuse (the featlab command's setting): the heap then
    never shrinks, so anything left behind per batch would pile up."""
    small = peak_rss_kib(200, tmp_path / "small.h5", allocator)
    large = peak_rss_kib(2000, tmp_path / "large.h5", allocator)
    written = (tmp_path / "large.h5").stat().st_size
    assert written > 2000 * 64 * 48 * 48 * 2  # the large cache really holds ~590 MB
    assert large < 1.5 * small, (small, large)
