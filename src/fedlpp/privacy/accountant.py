"""The run's privacy accountant as one object: its ledger, the round it admits, epsilon, its checkpoint field.

The server asks it before each round (``admit``: would this round's clients push epsilon past
``privacy.stop_at``?), tells it when the round is done (``commit``), and writes what it says
into the metrics row, the checkpoint and the summary. Without DP the accountant is
``NoPrivacy``: it admits every round and records nothing. The ledger's arithmetic lives in
``plan.py`` and ``accounting.py`` (accounting math apart from accountant state, STYLE 8).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fedlpp.privacy.plan import Ledger, PrivacyPlan, guarantee

log = logging.getLogger(__name__)

LEDGER_KEY = "privacy_ledger"  # checkpoint metadata: the accountant's history, saved with the adapter


class Accountant(Protocol):
    shows_training_loss: bool  # whether the clients' (un-noised) training loss may go into the metrics

    def admit(self, round_: int, clients: Sequence[int]) -> str | None:
        """None when the round may run with these clients; otherwise why the run stops before it."""
        ...

    def commit(self, contributors: Sequence[int] | None = None) -> None:
        """The admitted round ran: what it spent is final (``contributors``: whose inputs the released sum holds,
        where that is known — secure aggregation's survivors)."""
        ...

    def row(self) -> dict[str, Any]:
        """The metrics row's privacy fields after the last committed round."""
        ...

    def checkpoint(self) -> dict[str, str]:
        """The checkpoint metadata that lets a resumed run continue this accountant."""
        ...

    def summary(self) -> dict[str, Any]:
        """The summary's privacy fields (none without DP)."""
        ...


class NoPrivacy:
    """No DP: every round is admitted and nothing is accounted."""

    shows_training_loss = True

    def admit(self, round_: int, clients: Sequence[int]) -> str | None:
        return None

    def commit(self, contributors: Sequence[int] | None = None) -> None:
        pass

    def row(self) -> dict[str, Any]:
        return {}

    def checkpoint(self) -> dict[str, str]:
        return {}

    def summary(self) -> dict[str, Any]:
        return {}


@dataclass
class LedgerAccountant:
    """DP-SGD or client-level DP: every unit's history of noisy steps, epsilon from it."""

    plan: PrivacyPlan
    ledger: Ledger
    pending: Ledger | None = None  # the ledger once the admitted round has run
    admitted: list[int] = field(default_factory=list)  # the admitted round's clients
    shows_training_loss = False  # the clients' loss is computed from their data without noise

    @classmethod
    def start(cls, plan: PrivacyPlan) -> LedgerAccountant:
        return cls(plan, Ledger(plan.noise_multiplier))

    @classmethod
    def replayed(cls, plan: PrivacyPlan, rounds: Sequence[Sequence[int]]) -> LedgerAccountant:
        """The accountant after ``rounds`` (each round's charged clients, in order — under distributed DP its
        survivors): epsilon computed, never read back."""
        ledger = Ledger(plan.noise_multiplier)
        for clients in rounds:
            ledger = ledger.after_round(plan, clients)
        return cls(plan, ledger)

    def admit(self, round_: int, clients: Sequence[int]) -> str | None:
        self.admitted = list(clients)
        worst = None if self.plan.distributed is None else min(len(clients), self.plan.distributed.fewest_survivors)
        spent = self.ledger.after_round(self.plan, clients, worst)
        if spent.exceeds(self.plan):
            reason = (
                f"privacy budget: round {round_} would raise epsilon from {self.ledger.epsilon:.4g} to {spent.epsilon:.4g}, "
                f"above {self.plan.stop_at:g}; stopped after round {round_ - 1} with its checkpoint"
            )
            log.warning("%s", reason)
            return reason
        self.pending = spent
        return None

    def commit(self, contributors: Sequence[int] | None = None) -> None:
        if self.pending is None:
            raise RuntimeError("commit() without an admitted round")
        if self.plan.distributed is not None:  # charged for what happened: the survivors' shares, not the worst case
            self.pending = self.ledger.after_round(self.plan, self.admitted if contributors is None else contributors)
        self.ledger, self.pending = self.pending, None

    def row(self) -> dict[str, Any]:
        """epsilon (cumulative, at delta); per client under DP-SGD."""
        row: dict[str, Any] = {"epsilon": self.ledger.epsilon, "delta": self.plan.accounting.delta}
        if self.plan.mode == "dp_sgd":
            row["epsilon_per_client"] = dict(sorted(self.ledger.epsilons.items(), key=lambda kv: int(kv[0])))
        return row

    def checkpoint(self) -> dict[str, str]:
        return {LEDGER_KEY: self.ledger.to_json()}

    def summary(self) -> dict[str, Any]:
        return {"privacy": guarantee(self.plan, self.ledger)}
