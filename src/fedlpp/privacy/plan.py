"""A run's privacy: the noise it uses, what one round costs, and the ledger of what was spent.

``make_plan`` fixes sigma before training — calibrated from a target epsilon against the
run's real sampling rates and step counts, or given — and ``Ledger`` accumulates every
unit's history round by round. The ledger travels in the checkpoint, so a resumed run
continues the same accountant instead of starting again from zero.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from fedlpp.config import PrivacyConfig
from fedlpp.privacy.accounting import Accounting, CalibrationError, Step, add_steps, calibrate, epsilon
from fedlpp.privacy.discrete_gaussian import NoiseTooSmall
from fedlpp.privacy.distributed import DistributedNoise
from fedlpp.privacy.dp_sgd import sampling_rate

log = logging.getLogger(__name__)

RUN_UNIT = "clients"  # the one ledger entry of client-level DP
# Epsilon may exceed the stop line by this much (the accountant's own rounding).
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class PrivacyPlan:
    mode: str  # dp_sgd | client_dp
    noise_multiplier: float  # sigma
    clip_norm: float  # C (per example) or S (per client delta)
    accounting: Accounting
    rates: dict[str, float]  # unit -> sampling rate of one step
    steps_per_round: int  # steps a participating unit takes per round
    stop_at: float  # 0 = no limit
    calibrated_for: float  # the target epsilon sigma was calibrated to (0 = sigma given)
    expected_clients: float = 0.0  # client_dp: the public denominator of the noised mean
    secure_noise: bool = False
    distributed: DistributedNoise | None = None  # client_dp under SecAgg in Z_2^b: each client adds its share

    def units_of_round(self, clients: Iterable[int]) -> list[str]:
        if self.mode == "client_dp" and self.distributed is None:
            return [RUN_UNIT]
        return [str(c) for c in clients]

    def step_sigma(self, noise_multiplier: float, shares: int) -> float:
        """The noise multiplier one round's step is accounted at (distributed DP: its Gaussian equivalent)."""
        if self.distributed is None:
            return noise_multiplier
        return self.distributed.round_sigma(noise_multiplier, shares)

    @property
    def protected_unit(self) -> str:
        if self.mode == "client_dp":
            return "each client's whole dataset (client-level DP)"
        return "each single training example of a client (sample-level DP)"


def distributed_plan(
    cfg: PrivacyConfig, noise: DistributedNoise, participation: Mapping[int, int], clients_per_round: int
) -> PrivacyPlan:
    """Client-level DP under SecAgg in Z_2^b: z calibrated (or given) against the rounds the busiest client joins,
    each round priced by ``noise`` at sampling rate 1 (``privacy.distributed``)."""
    _warn_large_delta(cfg, len(participation))
    accounting = Accounting(cfg.accountant, "poisson", cfg.delta)
    rounds = max(participation.values(), default=0)
    sigma = cfg.noise_multiplier
    if cfg.epsilon > 0:
        sigma = calibrate_distributed(cfg.epsilon, noise, rounds, accounting)
        log.info(
            "privacy: distributed noise multiplier %.4f calibrated to epsilon %g at delta %g (%s accountant)",
            sigma,
            cfg.epsilon,
            cfg.delta,
            cfg.accountant,
        )
    return PrivacyPlan(
        mode="client_dp",
        noise_multiplier=sigma,
        clip_norm=cfg.clip_norm,
        accounting=accounting,
        rates={str(c): 1.0 for c in participation},
        steps_per_round=1,
        stop_at=cfg.stop_at,
        calibrated_for=cfg.epsilon,
        expected_clients=float(clients_per_round),
        secure_noise=True,  # the shares always come from each client's OS CSPRNG
        distributed=noise,
    )


def calibrate_distributed(target: float, noise: DistributedNoise, rounds: int, accounting: Accounting) -> float:
    """The smallest z (to 0.1%) whose epsilon after ``rounds`` rounds is <= ``target`` even if every round kept only
    the fewest survivors the protocol can unmask (fewer noise shares); with all K surviving epsilon ends lower."""

    def spent(z: float) -> float:
        try:
            return epsilon([(noise.round_sigma(z, noise.fewest_survivors), 1.0, rounds)], accounting)
        except NoiseTooSmall:  # too little noise for any guarantee: more is needed
            return math.inf
        except ValueError as e:  # the field cannot hold this much noise
            raise CalibrationError(f"privacy.epsilon: {target} needs more noise than {e}") from None

    if rounds <= 0:
        raise CalibrationError("privacy.epsilon: no client takes part in any round, so there is nothing to calibrate")
    low, high = 0.0, 1.0
    while spent(high) > target:
        low, high = high, 2 * high
    while high - low > 1e-3 * high:
        mid = (low + high) / 2
        low, high = (mid, high) if spent(mid) > target else (low, mid)
    return high


def make_plan(
    cfg: PrivacyConfig,
    client_sizes: Sequence[int],
    batch_size: int,
    local_steps: int,
    participation: Mapping[int, int],
    rounds: int,
    clients_per_round: int,
) -> PrivacyPlan:
    """Sigma and per-unit rates; ``participation`` is how many of the ``rounds`` each client joins."""
    n = len(client_sizes)
    _warn_large_delta(cfg, min(client_sizes, default=0) if cfg.mode == "dp_sgd" else n)
    if cfg.mode == "dp_sgd":
        rates = {str(c): sampling_rate(batch_size, size) for c, size in enumerate(client_sizes)}
        _warn_whole_clients(batch_size, client_sizes)
        schedules = [(rates[str(c)], participation.get(c, 0) * local_steps) for c in range(n)]
        accounting = Accounting(cfg.accountant, "poisson", cfg.delta)
        steps_per_round = local_steps
    else:
        rates = {RUN_UNIT: clients_per_round / n}
        schedules = [(rates[RUN_UNIT], rounds)]
        accounting = Accounting(cfg.accountant, cfg.client_sampling, cfg.delta, population=n)
        steps_per_round = 1
    sigma = cfg.noise_multiplier
    if cfg.epsilon > 0:
        sigma = calibrate(cfg.epsilon, schedules, accounting)
        log.info(
            "privacy: noise multiplier %.4f calibrated to epsilon %g at delta %g (%s accountant)",
            sigma,
            cfg.epsilon,
            cfg.delta,
            cfg.accountant,
        )
    return PrivacyPlan(
        mode=cfg.mode,
        noise_multiplier=sigma,
        clip_norm=cfg.clip_norm,
        accounting=accounting,
        rates=rates,
        steps_per_round=steps_per_round,
        stop_at=cfg.stop_at,
        calibrated_for=cfg.epsilon,
        expected_clients=float(clients_per_round),
        secure_noise=cfg.secure_noise,
    )


def _warn_large_delta(cfg: PrivacyConfig, units: int) -> None:
    """delta above 1 / ``units`` (the number of units a run protects: the smallest client's examples, or the clients)
    lets a mechanism reveal one of them outright: say so."""
    if units and cfg.delta > 1 / units:
        who = "examples of the smallest client" if cfg.mode == "dp_sgd" else "clients"
        log.warning(
            "privacy: privacy.delta=%g is above 1/%d (the run protects %d %s): a guarantee with this delta allows one "
            "of them to be revealed outright; the convention is delta < 1/n",
            cfg.delta,
            units,
            units,
            who,
        )


def _warn_whole_clients(batch_size: int, client_sizes: Sequence[int]) -> None:
    """DP-SGD's sampling amplification needs a batch smaller than the client; say when it is not."""
    whole = [c for c, size in enumerate(client_sizes) if size <= batch_size]
    if whole:
        log.warning(
            "privacy: train.batch_size=%d is at least the %d examples of client %d%s: each of their DP-SGD "
            "steps takes the whole client (sampling rate 1, no amplification by sampling); "
            "set a smaller train.batch_size",
            batch_size,
            client_sizes[whole[0]],
            whole[0],
            f" and {len(whole) - 1} more" if len(whole) > 1 else "",
        )


@dataclass(frozen=True)
class Ledger:
    """Every unit's history of noisy steps and its cumulative epsilon."""

    noise_multiplier: float
    histories: dict[str, list[Step]] = field(default_factory=dict)
    epsilons: dict[str, float] = field(default_factory=dict)

    def after_round(self, plan: PrivacyPlan, clients: Sequence[int], shares: int | None = None) -> Ledger:
        """The ledger once ``clients`` have taken this round's steps (client-level DP: the round itself).

        ``shares``: under distributed DP, how many noise shares the round's sum holds (its survivors; the budget
        check assumes the fewest the protocol allows); each of ``clients`` is charged for it."""
        histories = dict(self.histories)
        epsilons = dict(self.epsilons)
        units = plan.units_of_round(clients)
        if not units:
            return self
        sigma = plan.step_sigma(self.noise_multiplier, len(clients) if shares is None else shares)
        for unit in units:
            histories[unit] = add_steps(histories.get(unit, []), sigma, plan.rates[unit], plan.steps_per_round)
            epsilons[unit] = epsilon(histories[unit], plan.accounting)
        return Ledger(self.noise_multiplier, histories, epsilons)

    @property
    def epsilon(self) -> float:
        """The run's guarantee: the largest epsilon over units."""
        return max(self.epsilons.values(), default=0.0)

    def exceeds(self, plan: PrivacyPlan) -> bool:
        return plan.stop_at > 0 and self.epsilon > plan.stop_at + BUDGET_SLACK

    def to_json(self) -> str:
        return json.dumps({"noise_multiplier": self.noise_multiplier, "histories": self.histories, "epsilons": self.epsilons})

    @classmethod
    def from_json(cls, text: str) -> Ledger:
        data = json.loads(text)
        histories = {u: [(float(s), float(q), int(t)) for s, q, t in h] for u, h in data["histories"].items()}
        return cls(float(data["noise_multiplier"]), histories, {u: float(e) for u, e in data["epsilons"].items()})


def guarantee(plan: PrivacyPlan, ledger: Ledger) -> dict[str, object]:
    """The summary's privacy block, with one sentence a reader can quote."""
    eps, delta = ledger.epsilon, plan.accounting.delta
    mechanism = (
        "DP-SGD on every client (Opacus)"
        if plan.mode == "dp_sgd"
        else "DP-FedAvg (clipped client deltas, Gaussian noise on the sum)"
    )
    sampling = "Poisson" if plan.accounting.sampling == "poisson" else "fixed-size (replace-one)"
    if plan.distributed is not None:
        mechanism = (
            f"distributed discrete Gaussian under secure aggregation in Z_2^{plan.distributed.bits} (each client adds its "
            "share from its OS CSPRNG; the server sees only the noised sum; Kairouz et al. 2021, Prop. 14)"
        )
        sampling = "no amplification by sampling claimed: each client is charged for every round it joined (replace-one)"
    else:
        sampling += " sampling"
    norm = "C" if plan.mode == "dp_sgd" else "S"
    statement = (
        f"{plan.protected_unit[0].upper()}{plan.protected_unit[1:]} is protected by ({eps:.3g}, {delta:g})-DP: "
        f"{mechanism}, noise multiplier {plan.noise_multiplier:.4g}, clip norm {norm}={plan.clip_norm:g}, "
        f"{sampling}, {plan.accounting.accountant.upper()} accountant."
    )
    if not plan.secure_noise and plan.distributed is None:
        statement += (
            " The noise was drawn from the run's seed (reproducible research mode): the guarantee holds "
            "only against parties who do not know it; privacy.secure_noise=true draws it from the OS CSPRNG."
        )
    return {
        "mode": plan.mode,
        "unit": plan.protected_unit,
        "epsilon": eps,
        "delta": delta,
        "accountant": plan.accounting.accountant,
        "sampling": "none" if plan.distributed is not None else plan.accounting.sampling,
        "noise_multiplier": plan.noise_multiplier,
        "clip_norm": plan.clip_norm,
        "calibrated_for_epsilon": plan.calibrated_for or None,
        "statement": statement,
    }
