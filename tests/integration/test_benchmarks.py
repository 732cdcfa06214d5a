"""Every benchmark script runs to its summary at its smallest setting.

The scripts are the evidence behind ``benchmarks/README.md``; nothing else runs them, so a
change to the code they measure could break them unseen. These runs check that each one still
gets through every variant it compares and prints its summary, not its figures (no timing is
asserted: at these sizes they mean nothing).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"

RUNS = [  # script and arguments, a line of its summary
    ("bench_shapes.py --n 32 --repeats 1", "DataLoader"),
    ("bench_capture.py --batches 2 --batch-size 4 --repeats 1", "hooks storing references"),
    ("bench_extract.py --samples 32 --batch-size 16 --repeats 1",
     "goal (featlab extract >= 0.90 x bare)"),
    ("bench_extract.py --samples 48 --batch-size 16 --parts 1", "featlab"),
    ("bench_extract.py --samples 32 --batch-size 16 --fresh 1",
     "the command (featlab, memory kept) vs an ordinary bare forward"),
    ("bench_merge.py --samples 32 --repeats 1", "featlab merge --virtual"),
    ("bench_cka.py --quick --repeats 1", "featlab / products"),
    ("bench_probe.py --quick --repeats 1", "featlab PixelProbe, from the cache"),
    ("bench_saliency.py --quick", "featlab layer_cam, all points in one pass"),
    ("bench_heads.py --quick", "stages sweep"),
]


@pytest.mark.slow
@pytest.mark.parametrize("command, summary", RUNS, ids=[c for c, _ in RUNS])
def test_benchmark_runs_to_its_summary(command, summary, tmp_path):
    script, *args = command.split()
    if script == "bench_cka.py" and not all(importlib.util.find_spec(m)
                                            for m in ("ckatorch", "torch_cka")):
        pytest.skip("bench_cka's baselines are not installed (pip install -e '.[bench]')")
    env = {**os.environ, "FEATLAB_PROGRESS": "0", "TMPDIR": str(tmp_path)}
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary in done.stdout, done.stdout[-3000:]
