"""Which code produced a result: fedlpp's version and, when it runs from a git checkout, the commit.

summary.json and every benchmark's JSON carry ``code_version()``, so a figure can be traced to
the code that measured it. It is read once per process, when a run or a benchmark starts
(``run_experiment``, ``run_simulated``, ``serve_on_grid``, each benchmark's ``main``), so a commit
made while a long run goes on is not credited with it; a resumed run's summary names the code of
the process that finished it. The commit is read only when this very file is tracked by the checkout git
finds (an installed copy inside someone else's repository is not that repository's commit);
``modified`` says whether the project's ``src/`` or ``bench/`` (the folder two above this file,
which may sit inside a larger repository) differed from it (uncommitted or untracked files), and is
None when git could not tell.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_GIT_TIMEOUT_S = 10
_CODE_PATHS = ("src", "bench")  # what "modified" looks at: the package and the benchmarks, not results or configs


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """{"fedlpp": its version, "commit": 40 hex digits or None, "modified": bool or None}, read on the first call."""
    return read_code_version(Path(__file__))


def read_code_version(source: Path) -> dict[str, Any]:
    """``code_version`` for the checkout that tracks ``source``, read now."""
    commit = checkout_commit(source)
    modified = None
    if commit is not None:
        project = source.resolve().parents[2]  # <project>/src/fedlpp/provenance.py; the paths are relative to it
        status = _git(project, "status", "--porcelain", "--untracked-files=normal", "--", *_CODE_PATHS)
        modified = None if status is None else status != ""
    return {"fedlpp": _version(), "commit": commit, "modified": modified}


def checkout_commit(source: Path) -> str | None:
    """The HEAD commit of the git checkout that tracks ``source``; None without git, outside a checkout, or when
    the checkout does not track that file."""
    where = source.resolve().parent
    if _git(where, "ls-files", "--error-unmatch", source.name) is None:
        return None
    return _git(where, "rev-parse", "HEAD")


def _git(where: Path, *args: str) -> str | None:
    """git's stripped output, or None when git is missing or fails. --no-optional-locks: reading the status must not
    take the index lock a user's own git command may need at the same moment."""
    try:
        done = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(where), *args],
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _version() -> str:
    try:
        return metadata.version("fedlpp")
    except metadata.PackageNotFoundError:
        return "unknown"
