"""FedAvg as meta-learning: the decomposition of one client's update (Jiang et al., 2019, Eq. 2).

A client that takes K SGD steps of lr β from θ_0 sends θ_0 − θ_K = β Σ_{j<K} ∇L(θ_j).
The j = 0 term is the FedSGD gradient; each j ≥ 1 term is a first-order MAML gradient
after j inner steps. So g_FedAvg = g_FedSGD + Σ_{j≥1} g_FOMAML(j).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fedmeta.algorithms.client_update import LocalTraining, batch_order
from fedmeta.data.federated import Examples
from fedmeta.params import Params, norm, set_weights


class Decomposition(NamedTuple):
    """The gradients along one client's local trajectory, and what they add up to.

    ``fedavg_gradient`` is (θ_0 − θ_K) / β measured from the trajectory itself.
    """

    fedsgd: Params
    fomaml: list[Params]
    fedavg_gradient: Params

    def summed(self) -> Params:
        """g_FedSGD + Σ_j g_FOMAML(j), which should equal ``fedavg_gradient``."""
        return {k: self.fedsgd[k] + sum((g[k] for g in self.fomaml), torch.zeros_like(self.fedsgd[k]))
                for k in self.fedsgd}

    def norms(self) -> dict[str, float]:
        """The size of each term, to show how much FedAvg weighs adaptation over FedSGD."""
        return {
            "fedsgd": norm(self.fedsgd),
            **{f"fomaml({j + 1})": norm(g) for j, g in enumerate(self.fomaml)},
            "fedavg": norm(self.fedavg_gradient),
        }


def decompose_client_update(model: nn.Module, weights: Params, data: Examples, update: LocalTraining,
                            seed: int) -> Decomposition:
    """Replays ``update``'s local SGD steps from ``weights`` and records ∇L(θ_j) at each.

    Uses the same batch order as ``update(model, weights, data, seed)``; plain SGD only,
    because the identity holds for SGD steps.
    """
    if update.optimizer != "sgd":
        raise ValueError(f"the decomposition holds for client SGD, not {update.optimizer!r}")
    set_weights(model, weights)
    params = dict(model.named_parameters())
    gradients: list[Params] = []
    model.train()
    with torch.random.fork_rng(devices=[]):  # the same dropout stream as LocalTraining
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        for batches in batch_order(len(data), update.batch_size, generator, epochs=update.epochs, steps=update.steps):
            for index in batches:
                model.zero_grad(set_to_none=True)
                loss, count = update.loss(model(data.x[index]), data.y[index])
                (loss / max(count, 1)).backward()
                gradients.append({k: p.grad.detach().clone() for k, p in params.items()})
                with torch.no_grad():
                    for p in params.values():
                        p -= update.lr * p.grad
    fedavg_gradient = {k: (weights[k] - p.detach()) / update.lr for k, p in params.items()}
    return Decomposition(gradients[0], gradients[1:], fedavg_gradient)
