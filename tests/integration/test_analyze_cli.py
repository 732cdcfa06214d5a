"""`featlab analyze resolution|cka` on small shapes caches: files, tables, refusals, errors."""

from __future__ import annotations

import csv
import json
import warnings

import numpy as np
import pytest

import featlab
import featlab.testing as ft
from featlab.cli import main
from featlab.models import BackboneSpec

SPEC = BackboneSpec("tiny", "none", (0.5, 0.4, 0.3), (0.25, 0.2, 0.3), 32, 10)


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analyze")
    ds = featlab.load_dataset("shapes", split="val", size=32, length=20)
    for name, seed in (("a", 0), ("b", 1)):
        featlab.extract(ft.TinyResNet(seed=seed), ds, "all", tmp / f"{name}.h5", spec=SPEC,
                        batch_size=10, dtype="float16", num_workers=0, progress=False)
    return tmp


def test_resolution_writes_next_to_the_cache_and_refuses_to_overwrite(caches, capsys):
    cache = caches / "a.h5"
    assert main(["analyze", "resolution", str(cache), "-q"]) == 0
    out = capsys.readouterr().out
    assert "layer1.1" in out and "ceiling_majority" in out
    record = json.loads((caches / "a.resolution.json").read_text())
    assert [p["name"] for p in record["points"]] == featlab.open_cache(cache).point_names
    with open(caches / "a.resolution.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["point"] == "layer1.1" and rows[-1]["stride"] == "4"
    assert 0 < float(rows[-1]["ceiling_miou"]) <= 1
    assert main(["analyze", "resolution", str(cache), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("featlab analyze resolution: error:") and "--force" in err
    assert "\n" not in err
    assert main(["analyze", "resolution", str(cache), "-q", "--force", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 20


def test_cka_kinds_and_cross_model(caches, capsys, tmp_path):
    a, b = caches / "a.h5", caches / "b.h5"
    assert main(["analyze", "cka", str(a), "-q", "--device", "cpu"]) == 0
    assert "columns: 0=conv1" in capsys.readouterr().out
    saved = json.loads((caches / "a.cka-linear-gap.json").read_text())
    m = np.array(saved["matrix"])
    np.testing.assert_allclose(np.diag(m), 1.0, atol=1e-12)
    # another estimator is another result, beside the first; a folder --out holds the default name
    assert main(["analyze", "cka", str(a), "--estimator", "debiased", "-q", "--device",
                 "cpu"]) == 0
    assert json.loads((caches / "a.cka-linear-gap-debiased.json").read_text())["estimator"] == (
        "debiased")
    capsys.readouterr()  # options the kind does not use are named, on one line
    with warnings.catch_warnings():
        warnings.simplefilter("always", featlab.errors.FeatlabWarning)  # shown, as for users
        assert main(["analyze", "cka", str(a), "--bandwidth", "0.3", "--positions", "4",
                     "--out", str(tmp_path / "ignored"), "-q", "--device", "cpu"]) == 0
    assert capsys.readouterr().err == (
        "featlab analyze cka: warning: --bandwidth, --positions must go with the kind or spatial "
        "policy that uses it (--bandwidth: rbf, --batch-size: minibatch, --positions: pixels); "
        "ignored with --kind linear --spatial gap.\n")
    (tmp_path / "results").mkdir()
    assert main(["analyze", "cka", str(a), "--out", str(tmp_path / "results"), "-q",
                 "--device", "cpu"]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "a.cka-linear-gap.csv", "a.cka-linear-gap.json"]
    for kind, extra in (("rbf", ["--bandwidth", "0.5"]), ("minibatch", ["--batch-size", "5"])):
        out = tmp_path / kind
        assert main(["analyze", "cka", str(a), "--kind", kind, "--spatial", "pixels",
                     "--positions", "4", "--points", "stages", "--out", str(out), "-q",
                     "--device", "cpu", *extra]) == 0
        record = json.loads(out.with_suffix(".json").read_text())
        assert record["kind"] == kind and record["num_samples"] == 80
        assert record["names"] == ["layer1.0", "layer1.1"]
    capsys.readouterr()
    assert main(["analyze", "cka", str(a), str(b), "--points", "stages", "-q", "--json",
                 "--device", "cpu"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["cache2"]["path"].endswith("b.h5") and len(record["matrix"]) == 2
    assert (caches / "a.cka-linear-gap-vs-b.csv").exists()


@pytest.mark.parametrize("argv, message", [
    (["--points", "layer9"], "layer9"),
    (["--kind", "minibatch", "--batch-size", "2"], ">= 4"),
    (["--kind", "minibatch", "--estimator", "biased"], "unbiased"),
])
def test_cka_errors_are_one_line_with_exit_code_2(caches, capsys, tmp_path, argv, message):
    code = main(["analyze", "cka", str(caches / "a.h5"), "--out", str(tmp_path / "x"), "-q",
                 *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err


def test_cka_max_bytes_caps_the_memory_of_the_command(caches, capsys, tmp_path):
    argv = ["analyze", "cka", str(caches / "a.h5"), "--spatial", "flatten", "-q", "--out",
            str(tmp_path / "m")]
    assert main([*argv, "--max-bytes", "1K"]) == 2
    err = capsys.readouterr().err.strip()
    assert "(max_bytes=1,024)" in err and "or a larger max_bytes (--max-bytes)" in err
    assert "\n" not in err and not (tmp_path / "m").exists()
    assert main([*argv, "--max-bytes", "1G"]) == 0
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal: exit 2, one line
        main([*argv, "--max-bytes", "lots"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and "--max-bytes: must be a size in bytes, e.g. 12G" in err


def test_missing_cache_is_a_clean_error(tmp_path, capsys):
    assert main(["analyze", "cka", str(tmp_path / "nope.h5")]) == 2
    assert "nope.h5" in capsys.readouterr().err
