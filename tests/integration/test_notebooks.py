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
    *work, cleanup = cells
    for cell in work:
        # random weights: the suite must not depend on a pretrained checkpoint being cached
        source = "".join(cell["source"]).replace('WEIGHTS = "shapes"', 'WEIGHTS = "none"')
        exec(compile(source, f"{path.name}", "exec"), namespace)
    CHECKS[path.name](namespace)
    exec(compile("".join(cleanup["source"]), f"{path.name}", "exec"), namespace)
    assert not Path(namespace["tmp"]).exists()  # the last cell leaves nothing behind


def _skip_points(ns: dict) -> None:
    cache = ns["cache"]
    assert cache.complete and len(cache.ids) == 64
    assert "layer3.1" in cache._repr_html_()


def _layer_properties(ns: dict) -> None:
    names = ns["val"].point_names
    assert [r["point"] for r in ns["rows"]] == names
    assert all(0 <= r[k] <= 1 for r in ns["rows"] for k in ("miou", "null_miou", "random_miou"))
    assert ns["cka"].matrix.shape == (len(names), len(names))
    assert set(ns["maps"]["LayerCAM"]) == set(names)
    assert ns["props"]["probe_miou"] and ns["props"]["resolution_ceiling"]


def _skip_heads(ns: dict) -> None:
    result, rows = ns["result"], ns["rows"]
    assert [r["point"] for r in rows] == ["baseline", "relu", "layer1.1", "layer2.1", "layer3.1"]
    assert len(result.seeds) == 2 and all(len(r["gain_ci_images"]) == 2 for r in rows[1:])
    assert ns["skip"].settings["skip"] == "layer2.1" and len(ns["skip"].history) == 3
    assert {p["property"] for p in ns["preds"]} == set(ns["props"])


CHECKS = {"01_skip_points.ipynb": _skip_points, "02_layer_properties.ipynb": _layer_properties,
          "03_skip_heads.ipynb": _skip_heads}
