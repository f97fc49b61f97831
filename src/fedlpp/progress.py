"""Progress a person can follow: bars on a terminal, plain timed lines in a log file.

tqdm's nested bars redraw with cursor-movement escape codes; redirected to a file those
become litter. When stderr is not a terminal, a bar is a ``LineBar`` instead: a line when it
starts, one when it finishes, and between them one per step of a top-level bar (a round)
or at most one every ``LINE_INTERVAL_S`` seconds of a nested one (a round's client steps).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TextIO

LINE_INTERVAL_S = 30.0


class Bar(Protocol):
    """What the engine asks of a progress bar (tqdm has it)."""

    def update(self, n: int = 1) -> Any: ...
    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> Any: ...
    def close(self) -> Any: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, kind: Any, value: Any, traceback: Any, /) -> Any: ...


Show = Callable[[int, str], Bar]  # (total, description) -> an open bar (a context manager as well)


class LineBar:
    """A progress bar written as whole lines: readable in a log, no escape codes."""

    def __init__(
        self,
        total: int,
        desc: str,
        initial: int = 0,
        file: TextIO | None = None,
        interval: float = LINE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.n = total, desc, initial
        self.file, self.interval, self.clock = file or sys.stderr, interval, clock
        self.start = self.last = clock()
        self.postfix = ""
        self.closed = False
        self.printed = -1  # the count the last line showed
        self._line()

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.clock() - self.last >= self.interval:
            self._line()

    def set_postfix(self, ordered_dict: Mapping[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())
        if refresh:
            self._line()

    def close(self, failed: bool = False) -> None:
        if not self.closed:
            self.closed = True
            if failed or self.interval > 0 or self.printed != self.n:  # a top-level bar's last step line already says it all
                self._line(done=not failed, failed=failed)

    def _line(self, done: bool = False, failed: bool = False) -> None:
        self.last, self.printed = self.clock(), self.n
        elapsed = self.last - self.start
        end = f" done in {elapsed:.0f} s" if done else f" stopped after {elapsed:.0f} s" if failed else f" ({elapsed:.0f} s)"
        text = f"{self.desc}: {self.n}/{self.total}{end}"
        print(text + (f" [{self.postfix}]" if self.postfix else ""), file=self.file, flush=True)

    def __enter__(self) -> LineBar:
        return self

    def __exit__(self, kind: object, value: object, traceback: object, /) -> None:
        self.close(failed=kind is not None)


def open_bar(total: int, desc: str, *, enabled: bool = True, nested: bool = False, initial: int = 0) -> Bar:
    """A bar on stderr: tqdm on a terminal (``nested`` ones below the top one, gone when done), else a ``LineBar``."""
    from tqdm.auto import tqdm

    if not enabled:
        return tqdm(total=total, disable=True)
    if sys.stderr.isatty():
        return tqdm(total=total, desc=desc, initial=initial, position=1 if nested else 0, leave=not nested)
    return LineBar(total, desc, initial, interval=LINE_INTERVAL_S if nested else 0.0)


def shower(enabled: bool) -> Show | None:
    """The nested-bar factory the engine passes down (None: show nothing)."""
    if not enabled:
        return None
    return lambda total, desc: open_bar(total, desc, nested=True)
