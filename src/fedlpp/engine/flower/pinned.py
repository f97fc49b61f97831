"""The two waits of Flower 1.41 that fedlpp shortens in the processes it runs, each checked against the pinned source.

Neither is configurable in Flower 1.41, and both cost every message of a round:

- **The SuperNode's idle poll.** A SuperNode that finds no message waiting sleeps a literal
  3 s before it asks the SuperLink again, and waits for its ClientApp's reply in steps of
  0.5 s (``flwr/supernode/start_client_internal.py``: ``time.sleep(3)`` once,
  ``time.sleep(0.5)`` twice). :func:`shorten_supernode_poll` gives that one module a ``time``
  whose ``sleep`` turns the 0.5 s into a :class:`WaitedPoll`, a twentieth of the time waited
  so far, 0.02 s to 0.5 s (a SecAgg step's reply is seen at once, a long training step is not
  polled 50 times a second), and the 3 s into an :class:`IdlePoll` that starts at 0.02 s after a
  message, growing by half each empty look to ``FEDLPP_NODE_POLL_S`` (default 0.25 s) — a
  node in a round picks up its next message at once, an idle node asks the SuperLink (whose
  CPU pays for every look) four times a second.
- **The object pull's back-off.** A message becomes visible before its objects have all
  arrived (the sender pushes the message, then its objects), and a receiver that finds an
  object not yet there backs off 1 s, doubling to 10 s (``pull_objects``'s defaults in
  ``flwr/supercore/inflatable/inflatable_utils.py``): measured here, 1 s stalls in about
  half the rounds. :func:`shorten_pull_backoff` starts it at 0.02 s, capped at 1 s, with
  Flower's 500 tries per object and 2 h in all.

No fork and no copy of Flower's code: both check that the installed Flower is the pinned
version and that the code still holds exactly what was read (:func:`check_flower`), and
refuse to run otherwise; tests run the same checks, so the day Flower changes under them
the suite fails loudly instead of a patch silently doing nothing.
"""

from __future__ import annotations

import inspect
import os
import re
import time
import types
from collections.abc import Mapping
from typing import Any

from fedlpp.engine.flower.polls import IdlePoll, WaitedPoll, seconds_setting

FLOWER_VERSION = "1.41.0"  # the only Flower whose code these patches were read against
POLL_ENV = "FEDLPP_NODE_POLL_S"
DEFAULT_POLL_S = 0.25  # an idle node asks the SuperLink for work at least this often (Flower: 3 s)
FIRST_POLL_S = 0.02  # ... and this soon after it has answered a message (SecAgg's steps follow each other closely)
REPLY_POLL_S = 0.02  # how soon it first looks for its ClientApp's reply (Flower: every 0.5 s)
WAITS = {"time.sleep(3)": 1, "time.sleep(0.5)": 2}  # the literal waits in start_client_internal, and how often each occurs
PULL_DEFAULTS = {"initial_backoff": 1, "backoff_cap": 10, "max_tries_per_object": 500, "max_time": 7200}  # as read in 1.41
SHORT_PULL = {"initial_backoff": 0.02, "backoff_cap": 1.0}  # tries (500) and total time (2 h) as Flower has them


class FlowerChanged(RuntimeError):
    """The installed Flower is not the one these patches were written against."""


def check_flower() -> None:
    """Refuse (FlowerChanged) unless the pinned Flower is installed and both waits are as read from its source."""
    from importlib.metadata import version

    installed = version("flwr")
    if installed != FLOWER_VERSION:
        raise FlowerChanged(
            f"flwr {installed} is installed; fedlpp's shortened waits were read against flwr {FLOWER_VERSION} "
            "(reinstall with ./install.sh)"
        )
    _supernode_loop()
    _pull_functions()


def _supernode_loop() -> types.ModuleType:
    from flwr.supernode import start_client_internal

    try:
        source = inspect.getsource(start_client_internal)
    except OSError as e:
        raise FlowerChanged(f"flwr's source cannot be read ({e}): reinstall flwr {FLOWER_VERSION} with ./install.sh") from None
    found = {literal: source.count(literal) for literal in WAITS}
    calls = len(re.findall(r"\btime\.[a-z_]", source))
    if found != WAITS or calls != sum(WAITS.values()):
        raise FlowerChanged(
            f"flwr/supernode/start_client_internal.py no longer holds the waits {WAITS} and nothing else from "
            f"`time` (found {found}, {calls} uses of time); re-read it before shortening its poll"
        )
    return start_client_internal


def _pull_functions() -> list[Any]:
    from flwr.supercore.inflatable import inflatable_utils

    functions = [inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree]
    for function in functions:
        defaults = {k: (function.__kwdefaults__ or {}).get(k) for k in PULL_DEFAULTS}
        if defaults != PULL_DEFAULTS and defaults != {**PULL_DEFAULTS, **SHORT_PULL}:
            raise FlowerChanged(
                f"flwr's {function.__name__} has the pull defaults {defaults}, not {PULL_DEFAULTS} as read; "
                "re-read flwr/supercore/inflatable/inflatable_utils.py before shortening its back-off"
            )
    return functions


def poll_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """The SuperNode's idle poll from ``FEDLPP_NODE_POLL_S`` (seconds, 0.01 to 3)."""
    return seconds_setting(environ, POLL_ENV, DEFAULT_POLL_S, 3)


def short_waits(poll_s: float) -> types.SimpleNamespace:
    """A stand-in for the ``time`` module: Flower's 3 s idle wait becomes an IdlePoll up to ``poll_s``, and its 0.5 s
    wait for the worker's reply a WaitedPoll from REPLY_POLL_S up to 0.5 s; each kind of wait restarts the other."""
    idle, reply = IdlePoll(FIRST_POLL_S, poll_s), WaitedPoll(REPLY_POLL_S, 0.5)

    def sleep(seconds: float) -> None:
        if seconds >= 3:
            reply.reset()
            time.sleep(idle.next())
        else:  # while the worker answers: soon for a SecAgg step, rarely during a long training step
            idle.reset()
            time.sleep(reply.next())

    return types.SimpleNamespace(sleep=sleep)


def shorten_supernode_poll(poll_s: float) -> None:
    check_flower()
    _supernode_loop().time = short_waits(poll_s)  # type: ignore[attr-defined]


def shorten_pull_backoff() -> None:
    check_flower()
    for function in _pull_functions():
        function.__kwdefaults__ = {**(function.__kwdefaults__ or {}), **SHORT_PULL}
