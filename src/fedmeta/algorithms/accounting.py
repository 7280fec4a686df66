"""ε(δ) of DP-FedAvg after r rounds, from Google's ``dp-accounting`` (RDP or PLD).

A round is one Gaussian mechanism on the sum of the cohort's clipped deltas (noise
multiplier z, see ``fedmeta.algorithms.privacy``), applied to a sample of the N training
clients, so the accountant composes r sampled Gaussian mechanisms, for the sampling the
run actually uses:

- ``"fixed"``: fedmeta's cohort, m clients drawn without replacement
  (``FederatedDataset.sample_cohort``). dp-accounting's ``SampledWithoutReplacementDpEvent``
  (Wang, Balle, Kasiviswanathan 2019) holds for neighbouring populations that differ by
  *replacing* one client, under which the sum's L2 sensitivity is 2C (one clipped delta out,
  another in), so the event's Gaussian has multiplier z/2. Only the RDP accountant has it.
- ``"poisson"``: each client joins a round with probability q = m/N, independently
  (``fedmeta.algorithms.privacy.poisson_cohort``); ``PoissonSampledDpEvent`` with multiplier z, for populations that
  differ by adding or removing one client (sensitivity C). RDP and PLD both have it.

ε after r rounds is a function of (z, m, N, δ, r) alone, so a checkpoint's round count is
the accountant's whole state and a resumed run reports the same ε. Rounds skipped for lack
of updates count as spent: an upper bound.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Iterator

import numpy as np
from dp_accounting import dp_event, mechanism_calibration
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.privacy_accountant import NeighboringRelation, PrivacyAccountant
from dp_accounting.rdp import rdp_privacy_accountant

from fedmeta.algorithms.privacy import ACCOUNTANTS, SAMPLINGS

NOISE_MULTIPLIER_RANGE = (0.25, 1e2)
"""Where ``calibrate_noise_multiplier`` looks. Past 100, the noise on each coordinate of the
mean is 100·C/m, many times what the m clipped deltas (norm C at most) can move it. Below
0.25 a PLD needs gigabytes (0.76 GB at z = 0.2 for the shipped ``dp_fedavg``), and a target
that less noise meets, 0.25 meets too."""


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hides dp-accounting's warnings about RDP orders it leaves out of the minimum (they change nothing)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class Accounting:
    """The privacy of r rounds of DP-FedAvg with noise multiplier z over N training clients, cohorts of m."""

    noise_multiplier: float
    cohort_size: int
    population: int
    delta: float
    accountant: str = "rdp"
    sampling: str = "fixed"

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS or self.sampling not in SAMPLINGS:
            raise ValueError(f"accountant {self.accountant!r} and sampling {self.sampling!r}: expected one of "
                             f"{ACCOUNTANTS} and one of {SAMPLINGS}")
        if (self.accountant, self.sampling) == ("pld", "fixed"):
            raise ValueError("dp-accounting's PLD accountant has no event for a fixed-size cohort drawn without "
                             "replacement; use the 'rdp' accountant or 'poisson' sampling")
        if not 0 < self.cohort_size <= self.population:
            raise ValueError(f"cohort size {self.cohort_size} must be in 1..{self.population} (the population)")
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    @property
    def sampling_rate(self) -> float:
        return self.cohort_size / self.population

    def event(self, rounds: int) -> dp_event.DpEvent:
        """dp-accounting's event for ``rounds`` rounds (see the module docstring for the multipliers)."""
        if self.sampling == "fixed":
            one = dp_event.SampledWithoutReplacementDpEvent(
                self.population, self.cohort_size, dp_event.GaussianDpEvent(self.noise_multiplier / 2))
        else:
            one = dp_event.PoissonSampledDpEvent(self.sampling_rate, dp_event.GaussianDpEvent(self.noise_multiplier))
        return dp_event.SelfComposedDpEvent(one, rounds)

    def new_accountant(self) -> PrivacyAccountant:
        """A fresh accountant of the configured kind, for the neighbouring relation the sampling needs."""
        if self.accountant == "pld":
            return pld_privacy_accountant.PLDAccountant(NeighboringRelation.ADD_OR_REMOVE_ONE)
        fixed = self.sampling == "fixed"
        relation = NeighboringRelation.REPLACE_ONE if fixed else NeighboringRelation.ADD_OR_REMOVE_ONE
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)

    @functools.cached_property
    def _one_round_rdp(self) -> tuple[np.ndarray, np.ndarray]:
        with _quiet():
            accountant = self.new_accountant().compose(self.event(1))
        return accountant.orders, accountant.rdp

    def epsilon(self, rounds: int) -> float:
        """ε at ``delta`` after ``rounds`` rounds; what ``new_accountant().compose(event(rounds))`` gives.

        RDP composes by adding, so r rounds are r times one round's RDP (the accountant
        does the same sum); PLD composes the whole event each time.
        """
        if rounds == 0:
            return 0.0
        with _quiet():
            if self.accountant == "rdp":
                orders, rdp = self._one_round_rdp
                return float(rdp_privacy_accountant.compute_epsilon(orders, rounds * rdp, self.delta)[0])
            return float(self.new_accountant().compose(self.event(rounds)).get_epsilon(self.delta))


@functools.lru_cache(maxsize=256)
def calibrate_noise_multiplier(target_epsilon: float, rounds: int, cohort_size: int, population: int, delta: float,
                               accountant: str = "rdp", sampling: str = "fixed") -> float:
    """The smallest noise multiplier z (to 1e-4) whose ε(δ) after ``rounds`` rounds is at most ``target_epsilon``.

    A root search with the accountant (dp-accounting's ``calibrate_dp_mechanism``) within
    ``NOISE_MULTIPLIER_RANGE``, in a bracket found by doubling or halving z from 1, so
    that a PLD is never evaluated far below the answer, where its support grows. A target
    that even the largest z misses is refused; one that the smallest meets gets the smallest.
    A pure function of its arguments and about a second of work, so it is remembered: a
    process that asks again (a study's report rewritten, its runs resumed) gets it at once.
    """
    def epsilon(z: float) -> float:
        return Accounting(z, cohort_size, population, delta, accountant, sampling).epsilon(rounds)

    smallest, largest = NOISE_MULTIPLIER_RANGE
    floor = epsilon(largest)
    if floor > target_epsilon:
        raise ValueError(f"target epsilon {target_epsilon:g} cannot be reached in {rounds} rounds at delta "
                         f"{delta:g}: even noise multiplier {largest:g} gives epsilon {floor:.4g}")
    low, high = 1.0, 1.0
    if epsilon(1.0) > target_epsilon:
        while epsilon(high) > target_epsilon:
            low, high = high, min(2 * high, largest)
    else:
        while epsilon(low) <= target_epsilon:
            if low == smallest:
                return smallest
            low, high = max(low / 2, smallest), low
    accounting = Accounting(1.0, cohort_size, population, delta, accountant, sampling)
    with _quiet():
        return float(mechanism_calibration.calibrate_dp_mechanism(
            accounting.new_accountant,
            lambda z: Accounting(z, cohort_size, population, delta, accountant, sampling).event(rounds),
            target_epsilon, delta, mechanism_calibration.ExplicitBracketInterval(low, high), tol=1e-4))
