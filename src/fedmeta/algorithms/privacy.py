"""User-level differential privacy on the server: DP-FedAvg's clipped, noised, fixed-denominator mean.

McMahan, Ramage, Talwar, Zhang. *Learning Differentially Private Recurrent Language
Models*. ICLR 2018, Algorithm 1 with the fixed-denominator estimator f̃_f: each cohort
client's delta is clipped to L2 norm C, the clipped deltas are summed, Gaussian noise of
std z·C is added to the sum, and the sum is divided by the expected cohort size m (not by
the number of updates that came back), so that one client moves the result by at most C/m
whatever the others send. Every client weighs the same (w_k = 1): a weight that grows with
a client's examples would let one user move the mean by more than C/m.

Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy. *Differentially Private Learning
with Adaptive Clipping*. NeurIPS 2021, Algorithm 1): each round also counts the clients
whose delta was not clipped, b_i = 1[‖Δ_i‖ ≤ C], releases that count with Gaussian noise
of std σ_b, and moves C geometrically toward the norm at the target quantile γ:

    b̄ = (Σ_i (b_i − ½) + N(0, σ_b²)) / m + ½        C ← C · exp(−η_C (b̄ − γ))

Both releases are one Gaussian mechanism whose noise multiplier is z, when the delta's
noise has the multiplier z_Δ = (z⁻² − (2σ_b)⁻²)^(−½) (the paper's Theorem 1); the
accountant sees z.

The noise of a round comes from a generator seeded with ``client_seed(seed, rounds,
stream)``, ``rounds`` counting the rounds this aggregator has released (its state, with
C), so the same seed gives the same bits and a resumed run the same noise. Whoever
knows the seed can subtract the noise: a simulation's seed is no secret, a deployment's
must be.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from fedmeta.algorithms.aggregators import Aggregator
from fedmeta.algorithms.algorithm import Schedule, Switch
from fedmeta.client_work import ClientUpdate
from fedmeta.data.federated import ClientData, FederatedDataset
from fedmeta.params import Params, client_seed, norm

ACCOUNTANTS = ("rdp", "pld")
SAMPLINGS = ("fixed", "poisson")
"""How a round's cohort is drawn: m clients without replacement (``sample_cohort``), or each with probability m/N."""


class AdaptiveClipping(NamedTuple):
    """Andrew et al.'s clip update: target unclipped quantile γ, step η_C, std σ_b of the unclipped count."""

    target_quantile: float
    lr: float
    count_stddev: float


def value_noise_multiplier(noise_multiplier: float, adaptive: AdaptiveClipping | None) -> float:
    """z_Δ, the multiplier of the delta's noise that leaves the whole round at ``noise_multiplier`` z.

    Without adaptive clipping z_Δ = z. With it, z_Δ = (z⁻² − (2σ_b)⁻²)^(−½), which needs
    z < 2σ_b: the noised count alone already costs what z allows otherwise.
    """
    if adaptive is None or noise_multiplier == 0:
        return noise_multiplier
    if not noise_multiplier < 2 * adaptive.count_stddev:
        raise ValueError(f"noise multiplier {noise_multiplier:g} needs an unclipped-count std above "
                         f"{noise_multiplier / 2:g} (its half), got {adaptive.count_stddev:g}")
    return (noise_multiplier**-2 - (2 * adaptive.count_stddev) ** -2) ** -0.5


def clip_factor(delta: Params, clip: float) -> float:
    """min(1, C / ‖Δ‖): the factor that brings ``delta`` within L2 norm ``clip`` (1 for a delta already within)."""
    size = norm(delta)
    return 1.0 if size <= clip else clip / size


def private_mean(noise_multiplier: float, clip: float, denominator: float, seed: int, like: Params, *,
                 adaptive: AdaptiveClipping | None = None, stream: str = "privacy") -> Aggregator:
    """DP-FedAvg's mean: (Σ_i clip(Δ_i) + N(0, (z_Δ·C)²)) / ``denominator``, with C fixed or adaptive.

    ``noise_multiplier`` is z, the whole round's (see ``value_noise_multiplier``);
    ``clip`` is C, or its initial value with ``adaptive``; ``denominator`` is the expected
    cohort size; ``like`` gives the keys, shapes and dtypes of a delta, so that a round no
    update came back from still releases its noise. The state is ``{"clip": C, "rounds":
    rounds released}``. With z = 0 and C = inf the result is the uniform mean's, bit for
    bit, whenever all ``denominator`` clients came back.
    """
    if not noise_multiplier >= 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier}")
    if not clip > 0:
        raise ValueError(f"clip norm must be > 0, got {clip}")
    if not denominator > 0:
        raise ValueError(f"denominator must be > 0, got {denominator}")
    value_multiplier = value_noise_multiplier(noise_multiplier, adaptive)
    zeros = {k: torch.zeros_like(w) for k, w in like.items()}

    def init() -> dict:
        return {"clip": float(clip), "rounds": 0}

    def apply(updates: Sequence[ClientUpdate], state: dict) -> tuple[Params, dict]:
        bound = state["clip"]
        factors = [clip_factor(u.delta, bound) for u in updates]
        weights = [f / denominator for f in factors]
        if updates:  # accumulated as weighted_mean accumulates, so z = 0 and C = inf give its bits
            delta = {}
            for key, first in updates[0].delta.items():
                total = first * weights[0]
                for w, u in zip(weights[1:], updates[1:]):
                    total.add_(u.delta[key], alpha=w)
                delta[key] = total
        else:
            delta = {k: z.clone() for k, z in zeros.items()}
        generator = torch.Generator().manual_seed(client_seed(seed, state["rounds"], stream))
        std = value_multiplier * bound / denominator if value_multiplier else 0.0
        for key, value in delta.items():
            if value.is_floating_point():
                value.add_(torch.randn(value.shape, generator=generator, dtype=value.dtype), alpha=std)
        next_state = {"clip": bound, "rounds": state["rounds"] + 1}
        if adaptive is not None:
            unclipped = sum(1.0 for f in factors if f == 1.0)
            count_noise = float(torch.randn((), generator=generator, dtype=torch.float64))
            share = (unclipped - len(updates) / 2 + adaptive.count_stddev * count_noise) / denominator + 0.5
            next_state["clip"] = bound * math.exp(-adaptive.lr * (share - adaptive.target_quantile))
        return delta, next_state

    return Aggregator(init, apply)


def with_private_mean(schedule: Schedule, make: Callable[[str], Aggregator]) -> Schedule:
    """``schedule`` with every stage's aggregator replaced by ``make(stream)``, one noise stream per stage.

    A stage's aggregator starts afresh (its release count at 0), so each stage draws from
    its own stream: two stages never add the same noise.
    """
    if isinstance(schedule, Switch):
        return Switch(schedule.at_round, dataclasses.replace(schedule.before, aggregator=make("privacy/stage 0")),
                      dataclasses.replace(schedule.after, aggregator=make("privacy/stage 1")))
    return dataclasses.replace(schedule, aggregator=make("privacy"))



def poisson_cohort(dataset: FederatedDataset, rate: float, seed: int, round_idx: int) -> list[ClientData]:
    """Each training client with probability ``rate``, independently, from (seed, round) only; may be empty."""
    rng = np.random.default_rng(client_seed(seed, round_idx, "poisson cohort"))
    joins = rng.random(len(dataset.train_ids)) < rate
    return [dataset.clients[client_id] for client_id, joined in zip(dataset.train_ids, joins) if joined]
