"""The local-only baseline: no federated training at all.

Every client would do best, or worst, on its own data alone; that is the floor every
personalization method must beat. The global model never moves from its initial weights
(each client sends Δ = 0), so a held-out client's personalization, fine-tuning from the
global weights on its train split, is training its own model from scratch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedmeta.algorithms.client_update import ClientUpdate, Loss, masked_cross_entropy
from fedmeta.data.federated import Examples
from fedmeta.params import Params, set_weights


@dataclass(frozen=True)
class NoTraining:
    """A client update that trains nothing: Δ = 0; ``train_loss`` is θ's loss on the client's train split."""

    loss: Loss = masked_cross_entropy

    def __call__(self, model: nn.Module, weights: Params, data: Examples, seed: int) -> ClientUpdate:
        if len(data) == 0:
            raise ValueError("client has no training examples")
        set_weights(model, weights)
        model.eval()
        with torch.no_grad():
            loss, count = self.loss(model(data.x), data.y)
        delta = {k: torch.zeros_like(w) for k, w in weights.items()}
        return ClientUpdate(delta, len(data), {"train_loss": float(loss) / max(count, 1), "num_steps": 0,
                                               "num_samples": 0})
