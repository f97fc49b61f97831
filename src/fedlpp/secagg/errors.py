"""Errors of the secure-aggregation protocol: every one names who is at fault.

Nothing in this package fails silently (DESIGN 3.3: Flower's SecAgg+ logs "halted" and
the run continues unchanged). A round either returns the exact aggregate or raises one of
these; the caller then leaves its global state as it was.
"""

from __future__ import annotations

SERVER_ID = 0xFFFFFFFF  # the server's id in message headers; client ids are below it


def party_name(party: int | str) -> str:
    """Human name of a protocol party: ``"server"`` or ``"client 7"``.

    Args:
        party: A client id, ``SERVER_ID``, or an already readable name.

    Returns:
        The name used in error messages.
    """
    if isinstance(party, str):
        return party
    return "server" if party == SERVER_ID else f"client {party}"


class SecAggError(ValueError):
    """A message is malformed, truncated, out of place, forged or undecryptable.

    Attributes:
        sender: Who sent (or originated) the offending message.
        reason: What is wrong with it.
    """

    def __init__(self, sender: int | str, reason: str) -> None:
        self.sender = party_name(sender)
        self.reason = reason
        super().__init__(f"secagg: message from {self.sender} rejected: {reason}")


class SecAggAbort(RuntimeError):
    """Too few parties (or consistent shares) remain to finish safely; the round is void.

    Attributes:
        step: The protocol step that aborted (Bonawitz et al. 2017 round names).
        count: How many parties or shares were available, if a count is the cause.
        threshold: How many were needed, if a count is the cause.
    """

    def __init__(self, step: str, detail: str, count: int | None = None, threshold: int | None = None) -> None:
        self.step = step
        self.count = count
        self.threshold = threshold
        what = f"{count} {detail}, threshold is {threshold}" if count is not None else detail
        super().__init__(
            f"secagg round aborted at {step}: {what}; the aggregate is not revealed and the caller's state must stay unchanged"
        )


class SecAggRangeError(ValueError):
    """A client's value lies outside the declared range; it is never clipped silently.

    Attributes:
        client: The client whose update is out of range.
        index: Position of the first offending value in its vector.
        value: That value.
        clip_range: The declared bound r (|x| <= r is required).
    """

    def __init__(self, client: int, index: int, value: float, clip_range: float) -> None:
        self.client = client
        self.index = index
        self.value = value
        self.clip_range = clip_range
        super().__init__(
            f"secagg: {party_name(client)} value at index {index} is {value!r}, outside the "
            f"declared range [-{clip_range}, {clip_range}]; clip or rescale it before masking"
        )
