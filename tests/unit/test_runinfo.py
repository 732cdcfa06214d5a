"""What results record about the run that made them: featlab's commit, the device, the command."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest

import featlab.runinfo as runinfo

SOURCE = Path(runinfo.__file__)


def _load_copy(folder: Path):
    """featlab/runinfo.py copied under ``folder``/featlab and imported from there."""
    (folder / "featlab").mkdir(parents=True)
    shutil.copy(SOURCE, folder / "featlab" / "runinfo.py")
    spec = importlib.util.spec_from_file_location(f"runinfo_copy_{abs(hash(folder))}",
                                                  folder / "featlab" / "runinfo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True,
                          text=True).stdout.strip()


@pytest.fixture
def project(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git")
    _git(tmp_path, "init", "-q")
    (tmp_path / "notes.txt").write_text("a user's project\n")
    _git(tmp_path, "add", "notes.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return tmp_path


def test_the_commit_is_featlabs_own_and_says_when_it_has_local_changes(project):
    # featlab installed somewhere inside another project's repository: not featlab's commit
    assert _load_copy(project / ".venv" / "site").source_commit() is None
    # a checkout of featlab: its HEAD, and +dirty once a tracked file changes
    copy = _load_copy(project)
    _git(project, "add", "featlab/runinfo.py")
    _git(project, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    head = _git(project, "rev-parse", "HEAD")
    assert copy.source_commit() == head
    (project / "notes.txt").write_text("changed\n")
    copy.source_commit.cache_clear()
    assert copy.source_commit() == head + "+dirty"


def test_run_versions_record_the_device_and_the_command():
    made = runinfo.run_versions("cpu")
    assert made["device"] == "cpu" and made["command"] is None and "git" in made
    runinfo.command_line(["probe", "--train", "a b.h5"])
    try:
        assert runinfo.run_versions()["command"] == "featlab probe --train 'a b.h5'"
    finally:
        runinfo.command_line(None)
