"""Privacy accounting: cumulative epsilon from a history of noisy steps, and calibration.

A *history* is a list of ``(noise_multiplier, sampling_rate, steps)`` entries, in the
order they happened — the format of Opacus's accountants, so it can be stored in a
checkpoint and restored on resume (the accountant never restarts from zero).

Two sampling schemes are accounted exactly:

- ``poisson``: every unit (an example for DP-SGD, a client for client-level DP) joins a
  step independently with probability q; add/remove-one neighbours. Opacus's RDP or PRV
  accountant.
- ``fixed``: exactly m = q * n of n units per step (client-level DP with K of N clients
  a round); replace-one neighbours, under which the sum of deltas clipped to norm S has
  sensitivity 2S, so the Gaussian event is accounted with sigma / 2. dp-accounting's RDP
  accountant for sampling without replacement (Wang, Balle, Kasiviswanathan 2019).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import dp_accounting
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlpp.config import ConfigError

Step = tuple[float, float, int]  # (noise multiplier, sampling rate, number of steps)

# Opacus's default RDP orders plus larger ones: small noise or few steps put the optimum beyond 63.
RDP_ORDERS = [*RDPAccountant.DEFAULT_ALPHAS, 80, 96, 128, 160, 192, 256, 384, 512, 1024]
SIGMA_MAX = 1e4  # calibration gives up beyond this: the target cannot be met by noise


class CalibrationError(ConfigError):
    """No noise multiplier reaches the target epsilon (e.g. too many steps at rate 1)."""


@dataclass(frozen=True)
class Accounting:
    accountant: str  # "rdp" | "prv"
    sampling: str  # "poisson" | "fixed"
    delta: float
    population: int = 0  # n, for fixed-size sampling (m = q * n units a step)


def add_steps(history: Sequence[Step], sigma: float, rate: float, steps: int) -> list[Step]:
    """``history`` plus ``steps`` more steps at (sigma, rate), merged with the last entry when equal."""
    out = [tuple(h) for h in history]
    if steps <= 0:
        return out  # type: ignore[return-value]
    if out and out[-1][0] == sigma and out[-1][1] == rate:
        out[-1] = (sigma, rate, int(out[-1][2]) + steps)
    else:
        out.append((sigma, rate, steps))
    return out  # type: ignore[return-value]


class AccountingError(RuntimeError):
    """The accountant produced no meaningful epsilon (never stored, never printed)."""


def epsilon(history: Sequence[Step], acc: Accounting) -> float:
    """Cumulative epsilon at ``acc.delta`` after every step in ``history``; finite and >= 0, or an AccountingError."""
    value = _epsilon(history, acc)
    if not math.isfinite(value) or value < 0:
        raise AccountingError(
            f"the accountant gave epsilon = {value} for delta = {acc.delta:g} and steps {list(history)[:3]}...: "
            "that is no privacy guarantee, so the run stops here rather than report it"
        )
    return value


def _epsilon(history: Sequence[Step], acc: Accounting) -> float:
    history = [(float(s), float(q), int(t)) for s, q, t in history if int(t) > 0]
    if not history:
        return 0.0
    if acc.sampling == "fixed":
        return _epsilon_without_replacement(history, acc)
    if acc.accountant == "prv":
        accountant = PRVAccountant()
        accountant.history = list(history)
        return float(accountant.get_epsilon(delta=acc.delta))
    accountant = RDPAccountant()
    accountant.history = list(history)
    with warnings.catch_warnings():  # "optimal order is the largest alpha": RDP_ORDERS already reach far
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta=acc.delta, alphas=RDP_ORDERS))


def _epsilon_without_replacement(history: Sequence[Step], acc: Accounting) -> float:
    if acc.accountant != "rdp":
        raise ValueError("fixed-size sampling is accounted with RDP only")
    accountant = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    for sigma, rate, steps in history:
        sample = round(rate * acc.population)
        event = dp_accounting.GaussianDpEvent(sigma / 2)  # replace-one: sensitivity 2S
        accountant.compose(dp_accounting.SampledWithoutReplacementDpEvent(acc.population, sample, event), steps)
    return float(accountant.get_epsilon(acc.delta))


def worst_epsilon(sigma: float, schedules: Sequence[tuple[float, int]], acc: Accounting) -> float:
    """The largest epsilon over units that each take ``steps`` steps at ``rate``."""
    return max(epsilon([(sigma, q, t)], acc) for q, t in undominated(schedules))


def undominated(schedules: Sequence[tuple[float, int]]) -> list[tuple[float, int]]:
    """Schedules that no other schedule beats in both rate and steps (epsilon grows with each)."""
    unique = sorted({(float(q), int(t)) for q, t in schedules if t > 0})
    return [s for s in unique if not any(o != s and o[0] >= s[0] and o[1] >= s[1] for o in unique)]


def calibrate(target: float, schedules: Sequence[tuple[float, int]], acc: Accounting, rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose worst epsilon is <= ``target``."""
    if not undominated(schedules):
        raise CalibrationError("privacy.epsilon: no unit takes any step, so there is nothing to calibrate")
    low, high = 0.0, 1.0
    while worst_epsilon(high, schedules, acc) > target:
        low, high = high, 2 * high
        if high > SIGMA_MAX:
            raise CalibrationError(
                f"privacy.epsilon: {target} at delta {acc.delta} cannot be reached with any noise "
                f"multiplier <= {SIGMA_MAX:g}; allow a larger epsilon or fewer steps (fl.rounds, fl.local_steps)"
            )
    while high - low > rel_tol * high:
        mid = (low + high) / 2
        if worst_epsilon(mid, schedules, acc) > target:
            low = mid
        else:
            high = mid
    return high
