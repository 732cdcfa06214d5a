"""The notebooks run top to bottom against the current API (with random weights, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    for cell in cells:
        # random weights: the suite must not depend on a pretrained checkpoint being cached
        source = "".join(cell["source"]).replace('WEIGHTS = "shapes"', 'WEIGHTS = "none"')
        exec(compile(source, f"{path.name}", "exec"), namespace)
    cache = namespace["cache"]
    assert cache.complete and len(cache.ids) == 64
    assert "layer3.1" in cache._repr_html_()
