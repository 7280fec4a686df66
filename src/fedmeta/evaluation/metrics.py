"""Loss and accuracy of given weights on examples; reading weights, never training them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fedmeta.algorithms.client_update import masked_cross_entropy
from fedmeta.data.federated import IGNORE_INDEX, Examples


class LossAccuracy(NamedTuple):
    loss: float
    accuracy: float


@torch.no_grad()
def evaluate(model: nn.Module, data: Examples, batch_size: int = 512) -> LossAccuracy:
    """Mean loss and accuracy of the model as it is, over every counted target."""
    model.eval()
    loss_sum, correct, counted = 0.0, 0, 0
    for start in range(0, len(data), batch_size):
        x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
        logits = model(x)
        loss, count = masked_cross_entropy(logits, y)
        mask = y != IGNORE_INDEX
        correct += int(((logits.argmax(-1) == y) & mask).sum())
        loss_sum += float(loss)
        counted += count
    if counted == 0:
        raise ValueError("cannot evaluate on a split with no examples")
    return LossAccuracy(loss_sum / counted, correct / counted)
