"""A two-layer perceptron: a body (``fc1``) and a head (``fc2``), for methods that split them."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    """Flattened inputs → ``fc1`` (ReLU) → ``fc2`` class logits; FedRep and FedPer keep ``fc2`` personal."""

    def __init__(self, input_dim: int = 60, num_classes: int = 10, hidden: int = 32) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))
