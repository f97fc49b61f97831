"""Our epsilon against independent dp-accounting computations; calibration to published figures."""

from __future__ import annotations

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.privacy_accountant import NeighboringRelation
from dp_accounting.rdp import RdpAccountant

from fedlpp.privacy.accounting import Accounting, CalibrationError, add_steps, calibrate, epsilon, undominated

# The FFA-LoRA paper's DP setting: SST-2 over 3 clients, batch 200, 1000 rounds x 10 local steps.
SST2_RATE = 200 / (67_349 / 3)
SST2_STEPS = 1000 * 10


def _dp_accounting(sigma: float, rate: float, steps: int, delta: float, pld: bool) -> float:
    accountant = PLDAccountant() if pld else RdpAccountant()
    accountant.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("sigma,rate,steps", [(1.0, 0.01, 1000), (0.8, 0.05, 300), (2.0, 0.2, 50), (0.99, SST2_RATE, SST2_STEPS)])
def test_rdp_epsilon_matches_dp_accounting_within_one_percent(sigma, rate, steps):
    ours = epsilon([(sigma, rate, steps)], Accounting("rdp", "poisson", 1e-5))
    assert ours == pytest.approx(_dp_accounting(sigma, rate, steps, 1e-5, pld=False), rel=0.01)


@pytest.mark.parametrize("sigma,rate,steps", [(1.0, 0.01, 1000), (0.95, SST2_RATE, SST2_STEPS)])
def test_prv_epsilon_matches_dp_accounting_pld_within_one_percent(sigma, rate, steps):
    ours = epsilon([(sigma, rate, steps)], Accounting("prv", "poisson", 1e-5))
    assert ours == pytest.approx(_dp_accounting(sigma, rate, steps, 1e-5, pld=True), rel=0.01)


def test_fixed_size_client_sampling_is_replace_one_with_double_sensitivity():
    # K of N clients a round: replacing one client moves the clipped sum by up to 2S.
    acc = Accounting("rdp", "fixed", 1e-5, population=10)
    ours = epsilon([(2.0, 0.3, 50)], acc)
    ref = RdpAccountant(neighboring_relation=NeighboringRelation.REPLACE_ONE)
    ref.compose(dp_accounting.SampledWithoutReplacementDpEvent(10, 3, dp_accounting.GaussianDpEvent(1.0)), 50)
    assert ours == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)
    assert ours > epsilon([(2.0, 0.3, 50)], Accounting("rdp", "poisson", 1e-5))


def test_calibration_reproduces_the_ffa_lora_paper_setting():
    sigma = calibrate(6.0, [(SST2_RATE, SST2_STEPS)], Accounting("rdp", "poisson", 1e-5))
    assert sigma == pytest.approx(0.99, abs=0.01)
    assert epsilon([(sigma, SST2_RATE, SST2_STEPS)], Accounting("rdp", "poisson", 1e-5)) <= 6.0
    assert epsilon([(sigma * 0.99, SST2_RATE, SST2_STEPS)], Accounting("rdp", "poisson", 1e-5)) > 6.0


def test_prv_calibrates_less_noise_than_rdp():
    sigma = calibrate(6.0, [(SST2_RATE, SST2_STEPS)], Accounting("prv", "poisson", 1e-5))
    assert sigma == pytest.approx(0.95, abs=0.01)


def test_calibration_covers_the_worst_client():
    acc = Accounting("rdp", "poisson", 1e-5)
    schedules = [(0.02, 400), (0.05, 200), (0.02, 100)]
    sigma = calibrate(3.0, schedules, acc)
    worst = max(epsilon([(sigma, q, t)], acc) for q, t in schedules)
    assert 2.95 <= worst <= 3.0


def test_unreachable_target_is_a_clear_error():
    with pytest.raises(CalibrationError, match="cannot be reached"):
        calibrate(1e-7, [(1.0, 10_000)], Accounting("rdp", "poisson", 1e-5))


def test_history_merges_equal_steps_and_epsilon_grows():
    history = add_steps([], 1.0, 0.01, 10)
    history = add_steps(history, 1.0, 0.01, 10)
    assert history == [(1.0, 0.01, 20)]
    history = add_steps(history, 2.0, 0.01, 5)
    assert history == [(1.0, 0.01, 20), (2.0, 0.01, 5)]
    acc = Accounting("rdp", "poisson", 1e-5)
    values = [epsilon(add_steps([], 1.0, 0.01, t), acc) for t in (1, 10, 100, 1000)]
    assert values == sorted(values) and values[0] > 0
    assert epsilon([], acc) == 0.0


def test_dominated_schedules_are_dropped():
    assert undominated([(0.1, 10), (0.05, 10), (0.1, 5), (0.02, 40)]) == [(0.02, 40), (0.1, 10)]
