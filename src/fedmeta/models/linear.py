"""Multinomial logistic regression, the model of the Synthetic(alpha, beta) benchmark."""

from __future__ import annotations

import torch
from torch import nn


class LogisticRegression(nn.Module):
    """One linear layer from flattened inputs to class logits."""

    def __init__(self, input_dim: int = 60, num_classes: int = 10) -> None:
        super().__init__()
        self.linear = nn.Linear(input_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))
