"""Client updates, aggregators, server optimizers, and the algorithms they compose."""

from fedmeta.algorithms.aggregators import Aggregator, weighted_mean
from fedmeta.algorithms.algorithm import (
    FederatedAlgorithm, Schedule, ServerState, Switch, init_state, run_round,
)
from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining, local_sgd, masked_cross_entropy
from fedmeta.algorithms.faults import Faults
from fedmeta.algorithms.presets import centralized, fedavg, fedsgd, reptile, two_stage
from fedmeta.algorithms.server_optimizers import (
    ServerOptimizer, build_server_optimizer, server_adagrad, server_adam, server_sgd, server_yogi,
)

__all__ = [
    "Aggregator", "ClientUpdate", "Faults", "FederatedAlgorithm", "LocalTraining", "Schedule", "ServerOptimizer",
    "ServerState", "Switch", "build_server_optimizer", "centralized", "fedavg", "fedsgd", "init_state",
    "local_sgd", "masked_cross_entropy", "reptile", "run_round", "server_adagrad", "server_adam",
    "server_sgd", "server_yogi", "two_stage", "weighted_mean",
]
