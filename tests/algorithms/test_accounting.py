"""ε(δ) of DP-FedAvg against dp-accounting's own accountants, and the noise multiplier for a target ε."""

import pytest

dp_accounting = pytest.importorskip("dp_accounting")

from dp_accounting import dp_event  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402

from fedmeta.algorithms.accounting import NOISE_MULTIPLIER_RANGE, Accounting, calibrate_noise_multiplier  # noqa: E402

REPLACE_ONE = dp_accounting.NeighboringRelation.REPLACE_ONE


def fixed_cohort_epsilon(z, m, n, delta, rounds):
    """m of n clients without replacement: replacing one client moves the sum of C-clipped deltas by up to 2C,
    so the Gaussian of std z·C has multiplier z/2 for the replace-one relation this event needs."""
    accountant = rdp_privacy_accountant.RdpAccountant(neighboring_relation=REPLACE_ONE)
    event = dp_event.SampledWithoutReplacementDpEvent(n, m, dp_event.GaussianDpEvent(z / 2))
    return accountant.compose(event, rounds).get_epsilon(delta)


def poisson_epsilon(accountant, z, q, delta, rounds):
    """Each client with probability q: adding or removing one moves the sum by up to C, multiplier z."""
    return accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(z)), rounds).get_epsilon(delta)


@pytest.mark.parametrize("rounds", [1, 7, 50])
def test_epsilon_of_a_fixed_cohort_is_dp_accountings_sampling_without_replacement(rounds):
    accounting = Accounting(1.1, cohort_size=10, population=74, delta=1e-3)

    assert accounting.epsilon(rounds) == fixed_cohort_epsilon(1.1, 10, 74, 1e-3, rounds)


@pytest.mark.slow
@pytest.mark.parametrize("rounds", [1, 20])
def test_epsilon_of_poisson_cohorts_is_dp_accountings_by_rdp_and_by_pld(rounds):
    rdp = Accounting(0.9, cohort_size=10, population=74, delta=1e-3, accountant="rdp", sampling="poisson")
    pld = Accounting(0.9, cohort_size=10, population=74, delta=1e-3, accountant="pld", sampling="poisson")

    expected_rdp = poisson_epsilon(rdp_privacy_accountant.RdpAccountant(), 0.9, 10 / 74, 1e-3, rounds)
    expected_pld = poisson_epsilon(pld_privacy_accountant.PLDAccountant(), 0.9, 10 / 74, 1e-3, rounds)

    assert rdp.epsilon(rounds) == expected_rdp
    assert pld.epsilon(rounds) == expected_pld
    assert pld.epsilon(rounds) < rdp.epsilon(rounds)  # PLD is the tighter bound


def test_epsilon_grows_with_rounds_and_falls_with_noise():
    accounting = Accounting(1.0, cohort_size=10, population=100, delta=1e-4)
    noisier = Accounting(2.0, cohort_size=10, population=100, delta=1e-4)

    curve = [accounting.epsilon(r) for r in (0, 1, 10, 100)]

    assert curve[0] == 0.0 and curve == sorted(curve)
    assert noisier.epsilon(100) < accounting.epsilon(100)


@pytest.mark.slow
@pytest.mark.parametrize("accountant, sampling", [("rdp", "fixed"), ("rdp", "poisson")])
def test_the_calibrated_noise_multiplier_is_the_smallest_that_meets_the_target(accountant, sampling):
    z = calibrate_noise_multiplier(3.0, rounds=30, cohort_size=10, population=74, delta=1e-3,
                                   accountant=accountant, sampling=sampling)

    def epsilon(multiplier):
        return Accounting(multiplier, 10, 74, 1e-3, accountant, sampling).epsilon(30)

    assert epsilon(z) <= 3.0 < epsilon(z - 1e-3)


def test_a_target_no_noise_multiplier_reaches_is_refused():
    with pytest.raises(ValueError, match=r"target epsilon 0.001 cannot be reached in 30 rounds at delta 0.001: "
                                         r"even noise multiplier 100 gives epsilon"):
        calibrate_noise_multiplier(0.001, rounds=30, cohort_size=10, population=74, delta=1e-3)


def test_pld_refuses_a_fixed_size_cohort():
    with pytest.raises(ValueError, match="PLD accountant has no event for a fixed-size cohort"):
        Accounting(1.0, 10, 74, 1e-3, accountant="pld", sampling="fixed")


def test_a_target_the_least_noise_searched_meets_gets_that_noise():
    z = calibrate_noise_multiplier(1e6, rounds=5, cohort_size=10, population=74, delta=1e-3)

    assert z == NOISE_MULTIPLIER_RANGE[0]
    assert Accounting(z, 10, 74, 1e-3).epsilon(5) <= 1e6
