"""How long to wait before looking again: the rules every poll of a deployment follows.

``IdlePoll`` for looking for work (soon after some, rarely when idle), ``WaitedPoll`` for
looking for an answer (a fixed share of the time waited so far), ``seconds_setting`` for a
wait read from the environment. Each look is a request some process serves: these keep a
deployment quick between messages without polling hard through a long training step.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping


def seconds_setting(environ: Mapping[str, str], name: str, default: float, most: float) -> float:
    """A number of seconds from the environment variable ``name`` (0.01 to ``most``); ``default`` when unset."""
    raw = environ.get(name, "")
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not 0.01 <= value <= most:
        raise ValueError(f"{name}={raw!r}: expected seconds between 0.01 and {most:g}")
    return value


class IdlePoll:
    """Waits between empty looks for work: ``first`` after some work, then half as long again each time, up to ``cap``."""

    def __init__(self, first: float, cap: float, growth: float = 1.5) -> None:
        self.first, self.cap, self.growth = min(first, cap), cap, growth
        self.current = self.first

    def next(self) -> float:
        wait, self.current = self.current, min(self.cap, self.current * self.growth)
        return wait

    def reset(self) -> None:
        self.current = self.first


class WaitedPoll:
    """Waits while something is under way: a twentieth of the time waited so far (an answer is seen at most ~5% late),
    between ``first`` and ``cap`` — soon for a SecAgg step's short answer, rarely during a long training step."""

    def __init__(self, first: float, cap: float, fraction: float = 0.05) -> None:
        self.first, self.cap, self.fraction = first, cap, fraction
        self.since: float | None = None

    def next(self) -> float:
        now = time.monotonic()
        if self.since is None:
            self.since = now
        return self.after(now - self.since)

    def after(self, waited: float) -> float:
        """The wait once ``waited`` seconds have passed."""
        return min(self.cap, max(self.first, waited * self.fraction))

    def reset(self) -> None:
        self.since = None
