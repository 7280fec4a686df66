"""A federated algorithm is client update × aggregator × server optimizer.

One round (Jiang et al., 2019, Sec. 2): each cohort client runs its client update from
θ; the aggregator averages the deltas into Δ; the server optimizer steps θ with Δ as a
pseudo-gradient. A ``Switch`` runs one algorithm until a round and another after it,
which is the paper's Algorithm 1 (FedAvg with momentum, then Reptile with Adam).

A client update with state (Ditto, FedRep, FedPer, SCAFFOLD) has ``init_client_state(weights)``
and is called with (model, weights, data, state, seed), returning (update, new state);
the round hands it to the engine's ``map_stateful``, which keeps the states. A client
update that needs the server's state (SCAFFOLD's control variate) has ``round_input(server
state)``, the tensors it needs, and ``for_round(those tensors)``, the update of that round
(``round_start``), so that a deployment can send them to its clients.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence, Union

from torch import nn

from fedmeta.algorithms.aggregators import Aggregator
from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining, can_train_cohort, train_cohort
from fedmeta.algorithms.faults import Faults, collect_updates
from fedmeta.algorithms.server_optimizers import ServerOptimizer
from fedmeta.client_work import ClientState
from fedmeta.data.federated import ClientData
from fedmeta.params import Params, client_seed, norm


@dataclass(frozen=True)
class FederatedAlgorithm:
    """One algorithm: what a client computes, how updates combine, how the server steps.

    ``name`` is how runs and reports show it (``fedavg(E=2)``); the three parts are
    independent, so any client update composes with any aggregator and server optimizer.
    """

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
    """The server's state before ``round_idx``: ``weights`` and the fresh state of that round's stage."""
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

    def map_cohort(self, model: nn.Module, weights: Params, clients: Sequence[ClientData],
                   seeds: Sequence[int]) -> list[ClientUpdate] | None:
        """Every client's update as one batched computation (``train_cohort``), or None where it cannot be.

        None for an update or model ``train_cohort`` cannot run, and for a cohort with a
        client without training examples (whose error the engine reports client by client).
        """
        if not can_train_cohort(self.update, model) or any(c.num_train == 0 for c in clients):
            return None
        return train_cohort(self.update, model, weights, [c.train for c in clients], list(seeds))


def is_stateful(update: Any) -> bool:
    """Whether a client update keeps state per client between rounds."""
    return hasattr(update, "init_client_state")


@dataclass(frozen=True)
class StatefulTrainingWork:
    """Adapts a stateful client update to the engine's (model, weights, client, state, seed) contract."""

    update: Any

    def init_client_state(self, weights: Params) -> ClientState:
        return self.update.init_client_state(weights)

    def __call__(self, model: nn.Module, weights: Params, client: ClientData, state: ClientState,
                 seed: int) -> tuple[ClientUpdate, ClientState]:
        try:
            return self.update(model, weights, client.train, state, seed)
        except ValueError as error:
            raise ValueError(f"client {client.client_id!r}: {error}") from error


class _StatefulMap(NamedTuple):
    """An engine whose ``map`` is its ``map_stateful``, for callers that only know ``map`` (the fault rules)."""

    engine: Any

    def map(self, work: Any, weights: Params, clients: Sequence[ClientData], seeds: Sequence[int], *,
            on_error: str = "raise") -> list:
        return self.engine.map_stateful(work, weights, clients, seeds, on_error=on_error)


def round_start(schedule: Schedule, state: ServerState, round_idx: int) -> tuple[FederatedAlgorithm, ServerState, Any]:
    """The round's algorithm, the server state it starts from and the client update it runs.

    A new stage starts its own optimizer state (Adam after momentum SGD); a client update
    with ``round_input`` (SCAFFOLD's) gets the server's tensors of the round.
    """
    stage, algo = schedule.at(round_idx)
    if stage != state.stage:
        state = ServerState(state.weights, algo.aggregator.init(), algo.server_optimizer.init(state.weights), stage)
    update = algo.client_update
    if hasattr(update, "round_input"):
        update = update.for_round(update.round_input(state.server))
    return algo, state, update


def run_round(schedule: Schedule, state: ServerState, clients: Sequence[ClientData], *, engine: Any, seed: int,
              round_idx: int, faults: Faults | None = None) -> tuple[ServerState, dict[str, Any]]:
    """Returns the next ServerState and this round's metrics, keyed by part.

    Without ``faults`` every client must return an update (an error in one ends the
    round). With them, the round aggregates the clients that returned and passed the
    checks, or is skipped, leaving the state as it was (``fedmeta.algorithms.faults``);
    ``faults/`` metrics say what happened. ``client/`` metrics describe the accepted
    clients (aggregated unless the round is skipped); with none accepted, the rejected
    ones, so that a round whose every update is non-finite reports a non-finite loss
    (what the run loop's divergence stop looks for). A round that no update came back
    from has no ``client/train_loss``.
    """
    algo, state, update = round_start(schedule, state, round_idx)
    stage = state.stage
    started = time.perf_counter()
    seeds = [client_seed(seed, round_idx, c.client_id) for c in clients]
    work: Any = TrainingWork(update)
    if is_stateful(update):
        work, engine = StatefulTrainingWork(update), _StatefulMap(engine)
    if faults is None or not clients:  # no clients: a Poisson-sampled cohort can be empty, and DP still adds noise
        updates: list[ClientUpdate] = engine.map(work, state.weights, clients, seeds) if clients else []
        skipped, fault_metrics = False, {}
    else:
        outcome = collect_updates(faults, engine, work, state.weights, clients, seeds, seed=seed, round_idx=round_idx)
        updates, skipped, fault_metrics = outcome.accepted, outcome.skipped, outcome.metrics
    if skipped:
        next_state, delta_norm = state, 0.0
        updates = updates or outcome.rejected
    else:
        delta, aggregator_state = algo.aggregator.apply(updates, state.aggregator)
        weights, server_state = algo.server_optimizer.apply(state.weights, delta, state.server)
        next_state, delta_norm = ServerState(weights, aggregator_state, server_state, stage), norm(delta)
    seconds = time.perf_counter() - started
    examples = sum(u.num_examples for u in updates)
    samples_seen = sum(u.metrics["num_samples"] for u in updates)
    metrics: dict[str, Any] = {"stage": stage}
    if updates:
        metrics["client/train_loss"] = sum(u.metrics["train_loss"] * u.num_examples for u in updates) / examples
    metrics |= {
        "client/num_clients": len(updates),
        "client/num_examples": examples,
        "server/delta_norm": delta_norm,
        "time/round_seconds": seconds,
        "time/samples_per_second": samples_seen / seconds if seconds > 0 else 0.0,
        **fault_metrics,
    }
    return next_state, metrics
