"""Flower 1.41's own SuperNode, with its idle waits shortened: ``python -m fedlpp.engine.flower.supernode ARGS``.

A SuperNode that finds no message waiting sleeps a literal 3 s before it asks the
SuperLink again, and waits for its ClientApp's reply in steps of 0.5 s
(``flwr/supernode/start_client_internal.py``: ``time.sleep(3)`` once, ``time.sleep(0.5)``
twice). Every message of a round pays that wait. This module runs Flower's own
``flower_supernode()`` unchanged (the arguments are Flower's) after giving that one module a
``time`` whose ``sleep`` is capped: the 3 s wait becomes ``FEDLPP_NODE_POLL_S`` (default
0.2 s), the 0.5 s waits become 0.02 s. It is no fork and no copy: :func:`check_flower`
refuses to start unless the installed Flower is the pinned version and its source still
holds exactly those waits, and a test runs the same check, so the day Flower's code changes
under it the suite fails loudly instead of the patch silently doing nothing.
"""

from __future__ import annotations

import inspect
import math
import os
import re
import sys
import time
import types

from fedlpp.engine.flower import FLOWER_ENV  # noqa: F401 - Flower's switches are set before flwr is imported

FLOWER_VERSION = "1.41.0"  # the only Flower whose SuperNode loop this module was read against
POLL_ENV = "FEDLPP_NODE_POLL_S"
DEFAULT_POLL_S = 0.2  # an idle node asks the SuperLink for work this often (Flower: 3 s)
REPLY_POLL_S = 0.02  # how often it looks for its ClientApp's reply (Flower: 0.5 s)
WAITS = {"time.sleep(3)": 1, "time.sleep(0.5)": 2}  # the literal waits in start_client_internal, and how often each occurs


class FlowerChanged(RuntimeError):
    """The installed Flower is not the one this wrapper was written against."""


def check_flower() -> types.ModuleType:
    """Flower's SuperNode loop module, after checking it is the pinned version with the waits read from its source."""
    import flwr
    from flwr.supernode import start_client_internal

    version = getattr(flwr, "__version__", None) or _installed_version()
    if version != FLOWER_VERSION:
        raise FlowerChanged(f"flwr {version} is installed; fedlpp's SuperNode wrapper was read against flwr {FLOWER_VERSION} "
                            "(reinstall with ./install.sh)")
    source = inspect.getsource(start_client_internal)
    found = {literal: source.count(literal) for literal in WAITS}
    if found != WAITS or len(re.findall(r"\btime\.[a-z_]", source)) != sum(WAITS.values()):
        raise FlowerChanged(f"flwr/supernode/start_client_internal.py no longer holds the waits {WAITS} and nothing else from "
                            f"`time` (found {found}); re-read it before shortening its poll")
    return start_client_internal


def _installed_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def poll_seconds(environ: dict[str, str] | os._Environ[str] = os.environ) -> float:
    """The idle poll from ``FEDLPP_NODE_POLL_S`` (seconds, 0.01 to 3)."""
    raw = environ.get(POLL_ENV, "")
    if not raw:
        return DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.01 <= value <= 3:
        raise ValueError(f"{POLL_ENV}={raw!r}: expected seconds between 0.01 and 3")
    return value


def short_waits(poll_s: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module whose sleep turns Flower's 3 s into ``poll_s`` and its 0.5 s into REPLY_POLL_S."""

    def sleep(seconds: float) -> None:
        time.sleep(poll_s if seconds >= 3 else min(seconds, REPLY_POLL_S))

    return types.SimpleNamespace(sleep=sleep)


def main(argv: list[str]) -> None:
    module = check_flower()
    module.time = short_waits(poll_seconds())  # type: ignore[attr-defined]
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
