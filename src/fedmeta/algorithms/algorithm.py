"""A federated algorithm is client update × aggregator × server optimizer.

One round (Jiang et al., 2019, Sec. 2): each cohort client runs its client update from
θ; the aggregator averages the deltas into Δ; the server optimizer steps θ with Δ as a
pseudo-gradient. A ``Switch`` runs one algorithm until a round and another after it,
which is the paper's Algorithm 1 (FedAvg with momentum, then Reptile with Adam).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence, Union

from torch import nn

from fedmeta.algorithms.aggregators import Aggregator
from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining
from fedmeta.algorithms.server_optimizers import ServerOptimizer
from fedmeta.data.federated import ClientData
from fedmeta.params import Params, client_seed, norm


@dataclass(frozen=True)
class FederatedAlgorithm:
    name: str
    client_update: LocalTraining
    aggregator: Aggregator
    server_optimizer: ServerOptimizer

    def at(self, round_idx: int) -> tuple[int, FederatedAlgorithm]:
        """Returns (stage index, algorithm) for a round: a plain algorithm has one stage."""
        return 0, self


@dataclass(frozen=True)
class Switch:
    """Runs ``before`` for rounds < ``at_round`` and ``after`` from then on."""

    at_round: int
    before: FederatedAlgorithm
    after: FederatedAlgorithm

    @property
    def name(self) -> str:
        return f"{self.before.name}->{self.after.name}@{self.at_round}"

    def at(self, round_idx: int) -> tuple[int, FederatedAlgorithm]:
        return (0, self.before) if round_idx < self.at_round else (1, self.after)


Schedule = Union[FederatedAlgorithm, Switch]


class ServerState(NamedTuple):
    """Everything the server carries between rounds; the stage says whose state it is."""

    weights: Params
    aggregator: Any
    server: Any
    stage: int


def init_state(schedule: Schedule, weights: Params, round_idx: int = 0) -> ServerState:
    stage, algo = schedule.at(round_idx)
    return ServerState(weights, algo.aggregator.init(), algo.server_optimizer.init(weights), stage)


@dataclass(frozen=True)
class TrainingWork:
    """Adapts a client update to the engine's (model, weights, client, seed) contract.

    A frozen dataclass rather than a closure, so worker processes can receive it.
    """

    update: LocalTraining

    def __call__(self, model: nn.Module, weights: Params, client: ClientData, seed: int) -> ClientUpdate:
        try:
            return self.update(model, weights, client.train, seed)
        except ValueError as error:
            raise ValueError(f"client {client.client_id!r}: {error}") from error


def run_round(schedule: Schedule, state: ServerState, clients: Sequence[ClientData], *,
              engine: Any, seed: int, round_idx: int) -> tuple[ServerState, dict[str, float]]:
    """Returns the next ServerState and this round's metrics, keyed by part."""
    stage, algo = schedule.at(round_idx)
    if stage != state.stage:  # a new stage starts its own optimizer state (Adam after momentum SGD)
        state = ServerState(state.weights, algo.aggregator.init(), algo.server_optimizer.init(state.weights), stage)
    started = time.perf_counter()
    seeds = [client_seed(seed, round_idx, c.client_id) for c in clients]
    updates: list[ClientUpdate] = engine.map(TrainingWork(algo.client_update), state.weights, clients, seeds)
    delta, aggregator_state = algo.aggregator.apply(updates, state.aggregator)
    weights, server_state = algo.server_optimizer.apply(state.weights, delta, state.server)
    seconds = time.perf_counter() - started
    examples = sum(u.num_examples for u in updates)
    samples_seen = sum(u.metrics["num_samples"] for u in updates)
    metrics = {
        "stage": stage,
        "client/train_loss": sum(u.metrics["train_loss"] * u.num_examples for u in updates) / max(examples, 1),
        "client/num_clients": len(updates),
        "client/num_examples": examples,
        "server/delta_norm": norm(delta),
        "time/round_seconds": seconds,
        "time/samples_per_second": samples_seen / seconds if seconds > 0 else 0.0,
    }
    return ServerState(weights, aggregator_state, server_state, stage), metrics
