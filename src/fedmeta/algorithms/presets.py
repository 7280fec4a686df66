"""The paper's named algorithms, each a composition of the three parts.

- FedSGD: one full-batch gradient step per client, averaged by examples.
- FedAvg(E): E local epochs, averaged by examples, server SGD (momentum optional).
- Reptile(K): K local steps, uniform mean, a server optimizer with its own lr.
- two_stage: the paper's Algorithm 1, FedAvg(E) with server momentum, then Reptile(K)
  with server Adam from ``switch_round``.
- centralized: SGD on the pooled data of the training clients, written as one client
  holding all of it and a server step of lr 1 (the runner supplies that client).

Methods that followed the paper, composed from the same parts: ``fedprox``, ``maml`` and
``fomaml``, ``perfedavg``, ``pfedme``, and the ``local_only`` baseline (each cites its paper in its
client update's module). ``ditto``, ``fedrep``, ``fedper`` and ``scaffold`` have clients that keep
state between rounds (a personal model, a personal head, a control variate), which the engine holds.

Each trains on ``loss``, cross-entropy unless given (``fedmeta.evaluation.tasks``).
"""

from __future__ import annotations

from fedmeta.algorithms.aggregators import weighted_mean
from fedmeta.algorithms.algorithm import FederatedAlgorithm, Switch
from fedmeta.algorithms.client_update import Loss, local_sgd, masked_cross_entropy
from fedmeta.algorithms.ditto import DittoTraining
from fedmeta.algorithms.fedrep import PersonalHeadTraining
from fedmeta.algorithms.fedprox import proximal_sgd
from fedmeta.algorithms.local_only import NoTraining
from fedmeta.algorithms.maml import MetaGradient
from fedmeta.algorithms.per_fedavg import PerFedAvgTraining
from fedmeta.algorithms.pfedme import MoreauEnvelopeTraining
from fedmeta.algorithms.scaffold import ScaffoldTraining, scaffold_mean, with_control_variates
from fedmeta.algorithms.server_optimizers import ServerOptimizer, server_adam, server_sgd


def fedsgd(client_lr: float = 0.02, server_optimizer: ServerOptimizer | None = None,
           loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    return FederatedAlgorithm(
        "fedsgd", local_sgd(client_lr, batch_size=None, steps=1, loss=loss), weighted_mean("examples"),
        server_optimizer or server_sgd(1.0),
    )


def fedavg(local_epochs: int = 1, client_lr: float = 0.02, client_batch_size: int = 20,
           server_optimizer: ServerOptimizer | None = None, client_optimizer: str = "sgd",
           loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    return FederatedAlgorithm(
        f"fedavg(E={local_epochs})",
        local_sgd(client_lr, client_batch_size, epochs=local_epochs, optimizer=client_optimizer, loss=loss),
        weighted_mean("examples"), server_optimizer or server_sgd(1.0),
    )


def reptile(local_steps: int = 10, client_lr: float = 0.02, client_batch_size: int = 20,
            server_optimizer: ServerOptimizer | None = None, client_optimizer: str = "sgd",
            loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    return FederatedAlgorithm(
        f"reptile(K={local_steps})",
        local_sgd(client_lr, client_batch_size, steps=local_steps, optimizer=client_optimizer, loss=loss),
        weighted_mean("uniform"), server_optimizer or server_sgd(1.0),
    )


def two_stage(switch_round: int, *, local_epochs: int = 5, local_steps: int = 10, client_lr: float = 0.02,
              client_batch_size: int = 20, server_lr: float = 1.0, server_momentum: float = 0.9,
              reptile_server_lr: float = 1e-3, loss: Loss = masked_cross_entropy) -> Switch:
    """The paper's Algorithm 1: FedAvg(E) + server momentum, then Reptile(K) + server Adam."""
    if switch_round < 1:
        raise ValueError(f"switch_round must be >= 1, got {switch_round}")
    return Switch(
        switch_round,
        fedavg(local_epochs, client_lr, client_batch_size, server_sgd(server_lr, server_momentum), loss=loss),
        reptile(local_steps, client_lr, client_batch_size, server_adam(reptile_server_lr), loss=loss),
    )


def centralized(local_steps: int = 50, client_lr: float = 0.02, client_batch_size: int = 20,
                loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    return FederatedAlgorithm(
        "centralized", local_sgd(client_lr, client_batch_size, steps=local_steps, loss=loss),
        weighted_mean("examples"), server_sgd(1.0),
    )


def fedprox(mu: float, local_epochs: int = 1, client_lr: float = 0.02, client_batch_size: int = 20,
            server_optimizer: ServerOptimizer | None = None, client_optimizer: str = "sgd",
            loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """FedAvg(E) whose clients train on F + μ/2 ‖θ − θ_server‖² (Li et al. 2020); μ = 0 is FedAvg."""
    return FederatedAlgorithm(
        f"fedprox(mu={mu:g},E={local_epochs})",
        proximal_sgd(client_lr, mu, client_batch_size, epochs=local_epochs, optimizer=client_optimizer, loss=loss),
        weighted_mean("examples"), server_optimizer or server_sgd(1.0),
    )


def maml(inner_steps: int = 1, inner_lr: float = 0.02, client_batch_size: int = 20,
         server_optimizer: ServerOptimizer | None = None, *, second_order: bool = True,
         loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """Federated MAML(K) (FOMAML with ``second_order=False``): each client sends −(meta-gradient).

    The server optimizer's lr is the meta step size; its default, SGD lr 0.1, is a plain
    meta-gradient step.
    """
    return FederatedAlgorithm(
        f"{'maml' if second_order else 'fomaml'}(K={inner_steps})",
        MetaGradient(inner_lr, inner_steps, client_batch_size, second_order, loss),
        weighted_mean("uniform"), server_optimizer or server_sgd(0.1),
    )


def fomaml(inner_steps: int = 1, inner_lr: float = 0.02, client_batch_size: int = 20,
           server_optimizer: ServerOptimizer | None = None, loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    return maml(inner_steps, inner_lr, client_batch_size, server_optimizer, second_order=False, loss=loss)


def perfedavg(local_steps: int = 10, client_lr: float = 0.02, inner_lr: float = 0.02, client_batch_size: int = 20,
              variant: str = "fo", server_optimizer: ServerOptimizer | None = None,
              loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """Per-FedAvg (Fallah et al. 2020): τ = ``local_steps`` steps of β = ``client_lr``, inner α = ``inner_lr``.

    The server averages the client models uniformly, as the paper's Algorithm 1 does.
    """
    return FederatedAlgorithm(
        f"perfedavg-{variant}(tau={local_steps})",
        PerFedAvgTraining(client_lr, inner_lr, local_steps, client_batch_size, variant, loss),
        weighted_mean("uniform"), server_optimizer or server_sgd(1.0),
    )


def local_only(loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """No federated training: the global model stays at its initial weights (see ``local_only``)."""
    return FederatedAlgorithm("local_only", NoTraining(loss), weighted_mean("uniform"), server_sgd(1.0))


def ditto(lam: float, local_epochs: int = 1, client_lr: float = 0.02, client_batch_size: int = 20,
          server_optimizer: ServerOptimizer | None = None, client_optimizer: str = "sgd",
          loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """Ditto (Li et al. 2021): FedAvg(E) of the global model; each client also trains a personal model, pulled by λ."""
    training = local_sgd(client_lr, client_batch_size, epochs=local_epochs, optimizer=client_optimizer, loss=loss)
    return FederatedAlgorithm(f"ditto(lam={lam:g},E={local_epochs})", DittoTraining(training, lam),
                              weighted_mean("examples"), server_optimizer or server_sgd(1.0))


def fedrep(personal: tuple[str, ...], head_epochs: int = 1, local_epochs: int = 1, client_lr: float = 0.02,
           client_batch_size: int = 20, server_optimizer: ServerOptimizer | None = None,
           client_optimizer: str = "sgd", loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """FedRep (Collins et al. 2021): the client's head for ``head_epochs``, then the body for ``local_epochs``."""
    training = local_sgd(client_lr, client_batch_size, epochs=local_epochs, optimizer=client_optimizer, loss=loss)
    return FederatedAlgorithm(f"fedrep(head={head_epochs},E={local_epochs})",
                              PersonalHeadTraining(training, tuple(personal), head_epochs),
                              weighted_mean("examples"), server_optimizer or server_sgd(1.0))


def fedper(personal: tuple[str, ...], local_epochs: int = 1, client_lr: float = 0.02, client_batch_size: int = 20,
           server_optimizer: ServerOptimizer | None = None, client_optimizer: str = "sgd",
           loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """FedPer (Arivazhagan et al. 2019): body and the client's head trained together; the body is averaged."""
    training = local_sgd(client_lr, client_batch_size, epochs=local_epochs, optimizer=client_optimizer, loss=loss)
    return FederatedAlgorithm(f"fedper(E={local_epochs})", PersonalHeadTraining(training, tuple(personal)),
                              weighted_mean("examples"), server_optimizer or server_sgd(1.0))


def pfedme(lam: float, local_steps: int = 10, inner_steps: int = 5, client_lr: float = 0.02, inner_lr: float = 0.02,
           client_batch_size: int = 20, server_optimizer: ServerOptimizer | None = None,
           loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """pFedMe (Dinh et al. 2020): local steps on the Moreau envelope; the server optimizer's lr is β.

    The server averages the client models uniformly, as the paper's Algorithm 1 does.
    """
    return FederatedAlgorithm(
        f"pfedme(lam={lam:g},R={local_steps},K={inner_steps})",
        MoreauEnvelopeTraining(client_lr, lam, inner_lr, inner_steps, local_steps, client_batch_size, loss),
        weighted_mean("uniform"), server_optimizer or server_sgd(1.0),
    )


def scaffold(num_clients: int | None, local_epochs: int = 1, client_lr: float = 0.02, client_batch_size: int = 20,
             server_optimizer: ServerOptimizer | None = None, loss: Loss = masked_cross_entropy) -> FederatedAlgorithm:
    """SCAFFOLD (Karimireddy et al. 2020), option II: FedAvg(E) steps corrected by control variates.

    The server averages the clients uniformly, as the paper's Algorithm 1 does; the server
    optimizer's lr is η_g. ``num_clients`` is N, the number of training clients.
    """
    training = local_sgd(client_lr, client_batch_size, epochs=local_epochs, loss=loss)
    return FederatedAlgorithm(f"scaffold(E={local_epochs})", ScaffoldTraining(training), scaffold_mean(num_clients),
                              with_control_variates(server_optimizer or server_sgd(1.0)))
