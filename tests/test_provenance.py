"""Results name the code that made them: fedlpp's version and the commit of the checkout it runs from."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from fedlpp import provenance

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs git on PATH")


def git(where: Path, *args: str) -> str:
    command = ["git", "-c", "user.email=t@example.org", "-c", "user.name=t", "-C", str(where), *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@needs_git
def test_a_run_from_this_checkout_records_its_commit():
    here = Path(provenance.__file__)
    code = provenance.read_code_version(here)
    root = Path(git(here.parent, "rev-parse", "--show-toplevel"))
    assert code["commit"] == git(root, "rev-parse", "HEAD") and len(code["commit"]) == 40
    assert code["modified"] == (git(root, "status", "--porcelain", "--", "src", "bench") != "")
    assert code["fedlpp"] != "unknown"
    assert provenance.code_version()["commit"] is not None  # the cached value a run records


def test_modified_is_unknown_when_git_cannot_tell(monkeypatch):
    real = provenance._git
    monkeypatch.setattr(provenance, "_git", lambda where, *args: None if args[0] == "status" else real(where, *args))
    code = provenance.read_code_version(Path(provenance.__file__))
    assert code["modified"] is None


@needs_git
def test_a_file_another_repository_does_not_track_gets_no_commit(tmp_path):
    """An installed copy inside someone else's repository must not report that repository's commit."""
    git(tmp_path, "init", "-q")
    (tmp_path / "tracked.txt").write_text("x")
    git(tmp_path, "add", "tracked.txt")
    git(tmp_path, "commit", "-q", "-m", "one")
    stray = tmp_path / "module.py"
    stray.write_text("")
    assert provenance.checkout_commit(stray) is None
    assert provenance.checkout_commit(tmp_path / "tracked.txt") == git(tmp_path, "rev-parse", "HEAD")
    assert provenance.checkout_commit(Path("/") / "no-such-dir" / "x.py") is None
