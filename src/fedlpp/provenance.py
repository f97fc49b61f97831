"""Which code produced a result: fedlpp's version and, when it runs from a git checkout, the commit.

summary.json and every benchmark's JSON carry ``code_version()``, so a figure can be traced to
the code that measured it. The commit is read only when this very file is tracked by the
checkout git finds (an installed copy inside someone else's repository is not that repository's
commit); ``modified`` says whether tracked files differed from it.
"""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

_GIT_TIMEOUT_S = 10


@functools.lru_cache(maxsize=1)
def code_version() -> dict[str, Any]:
    """{"fedlpp": its version, "commit": 40 hex digits or None, "modified": bool or None (no commit)}."""
    commit = checkout_commit(Path(__file__))
    modified = None if commit is None else _git(Path(__file__).parent, "status", "--porcelain", "--untracked-files=no") != ""
    return {"fedlpp": _version(), "commit": commit, "modified": modified}


def checkout_commit(source: Path) -> str | None:
    """The HEAD commit of the git checkout that tracks ``source``; None without git, outside a checkout, or when
    the checkout does not track that file."""
    where = source.resolve().parent
    if _git(where, "ls-files", "--error-unmatch", source.name) is None:
        return None
    return _git(where, "rev-parse", "HEAD")


def _git(where: Path, *args: str) -> str | None:
    """git's stripped output, or None when git is missing or fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(where), *args], capture_output=True, text=True, timeout=_GIT_TIMEOUT_S, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _version() -> str:
    try:
        return metadata.version("fedlpp")
    except metadata.PackageNotFoundError:
        return "unknown"
