"""Loss and metrics of given weights on examples; reading weights, never training them."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from fedmeta.data.federated import Examples
from fedmeta.evaluation.tasks import CLASSIFICATION, Task

Value = float | tuple[float, ...]
"""A metric's value on a split: one number, or one per label."""


class Scores(NamedTuple):
    """Mean loss and each metric of the task by name, on one split."""

    loss: float
    metrics: dict[str, Value]

    @property
    def accuracy(self) -> Value:
        return self.metrics["accuracy"]


def _value(total: torch.Tensor, count: torch.Tensor) -> Value:
    means = torch.where(count > 0, total / count, torch.nan)
    return float(means) if means.dim() == 0 else tuple(means.tolist())


@torch.no_grad()
def evaluate(model: nn.Module, data: Examples, batch_size: int = 512, task: Task = CLASSIFICATION) -> Scores:
    """Mean loss and every metric of ``task`` of the model as it is, over every counted target."""
    model.eval()
    loss_sum, counted = 0.0, 0
    totals: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(data), batch_size):
        x, y = data.x[start:start + batch_size], data.y[start:start + batch_size]
        outputs = model(x)
        loss, count = task.loss(outputs, y)
        loss_sum += float(loss)
        counted += int(count)
        for metric in task.metrics:
            total, metric_count = metric.batch(outputs, y)
            sums = totals.setdefault(metric.name, [torch.zeros_like(total), torch.zeros_like(metric_count)])
            sums[0] += total
            sums[1] += metric_count
    if counted == 0:
        raise ValueError("cannot evaluate on a split with no examples")
    return Scores(loss_sum / counted, {name: _value(*sums) for name, sums in totals.items()})
