"""Ditto's client update: a FedAvg update of the global model, and a personal model pulled toward it.

Li, Hu, Beirami, Smith. *Ditto: Fair and Robust Federated Learning Through
Personalization*. ICML 2021, Eq. (2) and Algorithm 1. Client k, in a round from the
global weights w^t:

    global:   w_k ← local_epochs epochs of SGD on F_k from w^t; it sends Δ = w_k − w^t
    personal: v_k ← local_epochs epochs of SGD on F_k(v) + λ/2 ‖v − w^t‖², from its own v_k

The server averages the Δ as FedAvg does. λ = 0 makes v_k plain local training, carried
across rounds; a large λ keeps v_k at the global model.

The personal model v_k is the client's state: a full copy of the model's weights (every
parameter and buffer), made from the global weights of the round the client is first
sampled in. That is 4 bytes per weight: 2,440 B for the logistic regression of
Synthetic(0.5, 0.5) (610 weights), 6,760,184 B (6.8 MB) for the FedAvg CNN of FEMNIST, so
23 GB for TFF's 3,400 writers, all held in the memory of the process that runs the rounds
(``fedmeta.engine.states``). A held-out client personalizes by training Ditto's personal
model: v starts at the global weights and takes ``fine_tune_epochs`` epochs on
F + λ/2 ‖v − w‖² (``ProximalTraining`` with μ = λ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining, Loss, masked_cross_entropy
from fedmeta.algorithms.fedprox import ProximalTraining, _ProximalStep
from fedmeta.client_work import ClientState
from fedmeta.data.federated import Examples
from fedmeta.params import Params, client_seed, get_weights, set_weights


def check_lam(lam: float) -> None:
    if not 0 <= lam < math.inf:
        raise ValueError(f"Ditto lam must be >= 0 and finite, got {lam}")


@dataclass(frozen=True)
class _TowardGlobal(ProximalTraining):
    """``ProximalTraining`` pulled toward ``anchor`` (the global parameters, in ``model.parameters()`` order)."""

    anchor: tuple[torch.Tensor, ...] = field(default=(), compare=False, repr=False)

    def make_optimizer(self, model: nn.Module) -> _ProximalStep:  # type: ignore[override]
        optimizer = LocalTraining.make_optimizer(self, model)
        return _ProximalStep(optimizer, self.mu, list(model.parameters()), list(self.anchor))


@dataclass(frozen=True)
class DittoTraining:
    """Ditto's client: ``training`` from the global weights, then the same training of its personal model.

    ``train_loss`` is the global update's (comparable with FedAvg's); ``num_samples`` and
    ``num_steps`` count both trainings, which is what the client computes.
    """

    training: LocalTraining
    lam: float

    def __post_init__(self) -> None:
        check_lam(self.lam)

    def init_client_state(self, weights: Params) -> ClientState:
        return {k: w.clone() for k, w in weights.items()}

    def __call__(self, model: nn.Module, weights: Params, data: Examples, state: ClientState,
                 seed: int) -> tuple[ClientUpdate, ClientState]:
        update = self.training(model, weights, data, seed)
        t = self.training
        personal = _TowardGlobal(lr=t.lr, batch_size=t.batch_size, epochs=t.epochs, steps=t.steps,
                                 optimizer=t.optimizer, loss=t.loss, mu=self.lam,
                                 anchor=tuple(weights[name] for name, _ in model.named_parameters()))
        set_weights(model, state)
        epochs = list(personal.train_epochs(model, data, client_seed(seed, 0, "ditto/personal")))
        metrics = {**update.metrics,
                   "num_steps": update.metrics["num_steps"] + sum(e["num_steps"] for e in epochs),
                   "num_samples": update.metrics["num_samples"] + sum(e["num_samples"] for e in epochs)}
        return update._replace(metrics=metrics), get_weights(model)


def personal_fine_tuning(lam: float, lr: float, batch_size: int, epochs: int, optimizer: str = "sgd",
                         loss: Loss = masked_cross_entropy) -> ProximalTraining:
    """Ditto's personalization rule: the personal model trained from the global weights, pulled toward them."""
    check_lam(lam)
    return ProximalTraining(lr=lr, batch_size=batch_size, epochs=epochs, optimizer=optimizer, mu=lam, loss=loss)
