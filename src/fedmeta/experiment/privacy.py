"""A run's ``[privacy]``: the checks that need the dataset, the noise multiplier, the private schedule, ε per round.

dp-accounting is imported only for a run with privacy, so fedmeta runs without the
``privacy`` extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedmeta.algorithms.algorithm import Schedule
from fedmeta.algorithms.privacy import AdaptiveClipping, poisson_cohort, private_mean, with_private_mean
from fedmeta.data.federated import ClientData, FederatedDataset
from fedmeta.experiment.config import ExperimentConfig
from fedmeta.params import Params

if TYPE_CHECKING:
    from fedmeta.algorithms.accounting import Accounting


@dataclass(frozen=True)
class PrivateTraining:
    """DP-FedAvg as a run configures it: the accounting (z, m, N, δ) and adaptive clipping, if any."""

    accounting: Accounting
    adaptive: AdaptiveClipping | None

    def cohort(self, dataset: FederatedDataset, seed: int, round_idx: int) -> list[ClientData]:
        """The round's cohort, drawn as the accounting assumes."""
        accounting = self.accounting
        if accounting.sampling == "poisson":
            return poisson_cohort(dataset, accounting.sampling_rate, seed, round_idx)
        return dataset.sample_cohort(accounting.cohort_size, seed, round_idx)

    def metrics(self, rounds_done: int, aggregator_state: dict[str, Any]) -> dict[str, float]:
        """``privacy/`` metrics after ``rounds_done`` rounds: ε at δ, the noise multiplier, the next round's C."""
        return {"privacy/epsilon": self.accounting.epsilon(rounds_done),
                "privacy/noise_multiplier": self.accounting.noise_multiplier,
                "privacy/clip": aggregator_state["clip"]}

    def summary(self, rounds_done: int, aggregator_state: dict[str, Any]) -> dict[str, Any]:
        """What a run's evaluation.json says of its privacy after ``rounds_done`` rounds."""
        accounting = self.accounting
        return {"epsilon": accounting.epsilon(rounds_done), "delta": accounting.delta,
                "noise_multiplier": accounting.noise_multiplier, "clip": aggregator_state["clip"],
                "adaptive_clipping": self.adaptive is not None, "accountant": accounting.accountant,
                "sampling": accounting.sampling, "cohort_size": accounting.cohort_size,
                "population": accounting.population, "rounds": rounds_done}


def private_schedule(config: ExperimentConfig, schedule: Schedule, num_clients: int,
                     like: Params) -> tuple[Schedule, PrivateTraining | None]:
    """``schedule`` with DP-FedAvg's mean in every stage, and how the run is private; unchanged without privacy.

    ``num_clients`` is N, the training clients; ``like`` the weights a delta has the shape
    of. δ ≥ 1/N, a target ε no noise multiplier reaches and a noise multiplier adaptive
    clipping cannot split are refused here, before the run starts.
    """
    privacy = config.privacy
    if not privacy.enabled:
        return schedule, None
    from fedmeta.algorithms.accounting import Accounting, calibrate_noise_multiplier

    if not privacy.delta < 1 / num_clients:
        raise ValueError(f"privacy.delta = {privacy.delta:g}: expected below 1/N = 1/{num_clients} = "
                         f"{1 / num_clients:.3g}, N the number of training clients (a larger delta allows "
                         "releasing one client's data outright)")
    cohort_size = config.algorithm.cohort_size
    noise_multiplier = privacy.noise_multiplier
    if noise_multiplier is None:
        try:
            noise_multiplier = calibrate_noise_multiplier(privacy.target_epsilon, config.rounds, cohort_size,
                                                          num_clients, privacy.delta, privacy.accountant,
                                                          privacy.sampling)
        except ValueError as error:
            raise ValueError(f"privacy.target_epsilon = {privacy.target_epsilon:g}: {error}") from None
    adaptive = None
    if privacy.target_quantile is not None:
        adaptive = AdaptiveClipping(privacy.target_quantile, privacy.clip_lr,
                                    privacy.clipped_count_stddev or cohort_size / 20)
        if not noise_multiplier < 2 * adaptive.count_stddev:
            raise ValueError(f"privacy.target_epsilon = {privacy.target_epsilon:g} needs noise multiplier "
                             f"{noise_multiplier:.4g}, which adaptive clipping cannot split with an unclipped-count "
                             f"std of {adaptive.count_stddev:g}; raise privacy.clipped_count_stddev above "
                             f"{noise_multiplier / 2:.4g}")
    accounting = Accounting(noise_multiplier, cohort_size, num_clients, privacy.delta, privacy.accountant,
                            privacy.sampling)
    schedule = with_private_mean(schedule, lambda stream: private_mean(
        noise_multiplier, privacy.clip, cohort_size, config.seed, like, adaptive=adaptive, stream=stream))
    return schedule, PrivateTraining(accounting, adaptive)
