"""The paper's named algorithms, each a composition of the three parts.

- FedSGD: one full-batch gradient step per client, averaged by examples.
- FedAvg(E): E local epochs, averaged by examples, server SGD (momentum optional).
- Reptile(K): K local steps, uniform mean, a server optimizer with its own lr.
- two_stage: the paper's Algorithm 1, FedAvg(E) with server momentum, then Reptile(K)
  with server Adam from ``switch_round``.
- centralized: SGD on the pooled data of the training clients, written as one client
  holding all of it and a server step of lr 1 (the runner supplies that client).
"""

from __future__ import annotations

from fedmeta.algorithms.aggregators import weighted_mean
from fedmeta.algorithms.algorithm import FederatedAlgorithm, Switch
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.server_optimizers import ServerOptimizer, server_adam, server_sgd


def fedsgd(client_lr: float = 0.02, server_optimizer: ServerOptimizer | None = None) -> FederatedAlgorithm:
    return FederatedAlgorithm(
        "fedsgd", local_sgd(client_lr, batch_size=None, steps=1), weighted_mean("examples"),
        server_optimizer or server_sgd(1.0),
    )


def fedavg(local_epochs: int = 1, client_lr: float = 0.02, client_batch_size: int = 20,
           server_optimizer: ServerOptimizer | None = None, client_optimizer: str = "sgd") -> FederatedAlgorithm:
    return FederatedAlgorithm(
        f"fedavg(E={local_epochs})",
        local_sgd(client_lr, client_batch_size, epochs=local_epochs, optimizer=client_optimizer),
        weighted_mean("examples"), server_optimizer or server_sgd(1.0),
    )


def reptile(local_steps: int = 10, client_lr: float = 0.02, client_batch_size: int = 20,
            server_optimizer: ServerOptimizer | None = None, client_optimizer: str = "sgd") -> FederatedAlgorithm:
    return FederatedAlgorithm(
        f"reptile(K={local_steps})",
        local_sgd(client_lr, client_batch_size, steps=local_steps, optimizer=client_optimizer),
        weighted_mean("uniform"), server_optimizer or server_sgd(1.0),
    )


def two_stage(switch_round: int, *, local_epochs: int = 5, local_steps: int = 10, client_lr: float = 0.02,
              client_batch_size: int = 20, server_lr: float = 1.0, server_momentum: float = 0.9,
              reptile_server_lr: float = 1e-3) -> Switch:
    """The paper's Algorithm 1: FedAvg(E) + server momentum, then Reptile(K) + server Adam."""
    if switch_round < 1:
        raise ValueError(f"switch_round must be >= 1, got {switch_round}")
    return Switch(
        switch_round,
        fedavg(local_epochs, client_lr, client_batch_size, server_sgd(server_lr, server_momentum)),
        reptile(local_steps, client_lr, client_batch_size, server_adam(reptile_server_lr)),
    )


def centralized(local_steps: int = 50, client_lr: float = 0.02, client_batch_size: int = 20) -> FederatedAlgorithm:
    return FederatedAlgorithm(
        "centralized", local_sgd(client_lr, client_batch_size, steps=local_steps),
        weighted_mean("examples"), server_sgd(1.0),
    )
