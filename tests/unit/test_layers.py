"""The import direction of design.md's module map, read from the source: every import, the lazy
ones inside functions included (a stand-in for the import-linter contract the design suggests)."""

from __future__ import annotations

import ast
from pathlib import Path

import featlab

PACKAGE = Path(featlab.__file__).parent


def _imports() -> dict[str, set[str]]:
    """``{module: featlab modules it imports}`` for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[module] = {name for name in found if name.split(".")[0] == "featlab"}
    return out


def _offending(sources: str, targets: str, allowed: tuple[str, ...] = ()) -> list[str]:
    return sorted(f"{module} imports {name}" for module, names in _imports().items()
                  if module == sources or module.startswith(sources + ".")
                  for name in names
                  if (name == targets or name.startswith(targets + "."))
                  and not name.startswith(allowed or ("\0",)))


def test_the_scan_sees_lazy_imports():
    imports = _imports()
    assert "featlab.analysis.resolution" in imports["featlab.report.tables"]  # inside a function
    assert "featlab.segment.metrics" in imports["featlab.analysis.resolution"]


def test_analysis_and_segment_do_not_import_each_other():
    # the one exception: the confusion matrix both score with (design.md's public API places it
    # in featlab.segment.metrics, and the analyses' mIoU must be the heads' mIoU)
    assert _offending("featlab.analysis", "featlab.segment", ("featlab.segment.metrics",)) == []
    assert _offending("featlab.segment", "featlab.analysis") == []


def test_only_the_command_and_the_report_sit_above_analysis_and_segment():
    for lower in ("featlab.analysis", "featlab.segment", "featlab.cache", "featlab.capture",
                  "featlab.points", "featlab.models", "featlab.data"):
        assert _offending(lower, "featlab.report") == []
        assert _offending(lower, "featlab.cli") == []
    assert _offending("featlab.cache", "featlab.analysis") == []
    assert _offending("featlab.cache", "featlab.segment") == []


def test_errors_import_nothing_of_featlab():
    assert _imports()["featlab.errors"] == set()
