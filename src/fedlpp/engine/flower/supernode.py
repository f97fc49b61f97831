"""Flower 1.41's own SuperNode with its waits shortened: ``python -m fedlpp.engine.flower.supernode ARGS``.

The arguments are ``flower-supernode``'s; ``fedlpp deploy supernode`` starts this with
``--isolation process`` beside its warm worker (``node.py``). What is shortened, and how it
is checked against the pinned Flower, is ``pinned.py``.
"""

from __future__ import annotations

import sys

from fedlpp.engine.flower import pinned


def main(argv: list[str]) -> None:
    pinned.shorten_supernode_poll(pinned.poll_seconds())
    pinned.shorten_pull_backoff()
    from flwr.supernode.cli.flower_supernode import flower_supernode

    sys.argv = ["flower-supernode", *argv]
    flower_supernode()


if __name__ == "__main__":
    main(sys.argv[1:])
