"""What a model learns and how it is scored: a loss and the metrics reported for each client.

Classification (cross-entropy, accuracy) is the paper's task and the default. Regression
takes ``mse`` or ``mae``; multi-label classification ``bce_with_logits`` on one logit
per label, with targets of 0 and 1, scored per label.

A loss maps (model outputs, targets) to (summed loss, counted targets), so a batch holding
padding weighs what it counts. A metric does the same with (sum, count), scalars or one
per label; a client's value is sum / count over its test split. The first metric is the
primary one: a client is hurt by personalization when it moves against the primary
metric's direction, and the run's thresholds are on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from fedmeta.algorithms.client_update import Loss, masked_cross_entropy
from fedmeta.data.federated import IGNORE_INDEX

Totals = tuple[torch.Tensor, torch.Tensor]


def _like_targets(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``outputs`` in the shape of ``targets`` (``[N, 1]`` against ``[N]``), refused if their sizes differ.

    Without it, ``[N, 1] − [N]`` would broadcast to ``[N, N]`` and train on every pair.
    """
    if outputs.shape == targets.shape:
        return outputs
    if outputs.numel() != targets.numel():
        raise ValueError(f"the model's outputs of shape {tuple(outputs.shape)} do not match targets of shape "
                         f"{tuple(targets.shape)}")
    return outputs.reshape(targets.shape)


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ (output − target)², number of target values); its mean is ``F.mse_loss``."""
    diff = _like_targets(outputs, targets) - targets.to(outputs.dtype)
    return (diff * diff).sum(), targets.numel()


def absolute_error(outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ |output − target|, number of target values); its mean is ``F.l1_loss``."""
    return (_like_targets(outputs, targets) - targets.to(outputs.dtype)).abs().sum(), targets.numel()


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ BCE of each label's logit against its 0/1 target, number of labels); its mean is
    ``F.binary_cross_entropy_with_logits``."""
    loss = F.binary_cross_entropy_with_logits(_like_targets(logits, targets), targets.to(logits.dtype),
                                              reduction="sum")
    return loss, targets.numel()


def _count(value: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=torch.float64, device=like.device).expand_as(like)


def accuracy_totals(logits: torch.Tensor, targets: torch.Tensor) -> Totals:
    """(right argmax predictions, counted targets), skipping ``IGNORE_INDEX``."""
    counted = targets != IGNORE_INDEX
    return ((logits.argmax(-1) == targets) & counted).sum(), counted.sum()


@dataclass(frozen=True)
class ClassGroupAccuracy:
    """Accuracy over the targets in ``first``..``last`` only (right predictions, targets of the group).

    A client without targets of the group reports NaN for it, which means over clients skip.
    """

    first: int
    last: int

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> Totals:
        counted = (targets >= self.first) & (targets <= self.last)
        return ((logits.argmax(-1) == targets) & counted).sum(), counted.sum()


EMNIST_CLASS_GROUPS = {"digit": (0, 9), "letter": (10, 61), "upper": (10, 35), "lower": (36, 61)}
"""EMNIST-62's labels by kind: digits 0-9, upper-case letters 10-35, lower-case 36-61."""


def squared_error_totals(outputs: torch.Tensor, targets: torch.Tensor) -> Totals:
    total, count = squared_error(outputs, targets)
    return total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)


def absolute_error_totals(outputs: torch.Tensor, targets: torch.Tensor) -> Totals:
    total, count = absolute_error(outputs, targets)
    return total.double(), torch.tensor(float(count), dtype=torch.float64, device=total.device)


def label_accuracy_totals(logits: torch.Tensor, targets: torch.Tensor) -> Totals:
    """Per label: (examples whose logit > 0 exactly when the target is 1, examples)."""
    right = (_like_targets(logits, targets) > 0) == (targets > 0.5)
    correct = right.reshape(len(targets), -1).sum(0)
    return correct, _count(len(targets), correct)


@dataclass(frozen=True)
class Metric:
    """A number reported for each client: Σ over its test split / count, higher or lower being better.

    ``totals(outputs, targets)`` gives one batch's (sum, count), scalars or one per label
    (a per-label metric reports its mean over labels and each label). A user's function
    may return the batch's mean instead, as ``torch`` metrics do; it then counts each
    example once. Picklable when its function is (a module-level function), as engines
    with worker processes need.
    """

    name: str
    totals: Callable[[torch.Tensor, torch.Tensor], Any]
    higher_is_better: bool

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name:
            raise ValueError(f"metric name {self.name!r}: expected a non-empty name without '/' (it names a key "
                             "of metrics.jsonl)")

    def batch(self, outputs: torch.Tensor, targets: torch.Tensor) -> Totals:
        """This batch's (sum, count) as float64 tensors of the same shape."""
        value = self.totals(outputs, targets)
        if isinstance(value, tuple):
            total, count = (torch.as_tensor(v, dtype=torch.float64) for v in value)
            return total, count.expand_as(total)
        mean = torch.as_tensor(value).detach().double()
        return mean * len(targets), _count(len(targets), mean)


@dataclass(frozen=True)
class MeanLoss:
    """A loss that returns the batch's mean (as ``torch.nn.functional``'s do), as (sum, examples).

    Outputs of as many values as the targets come in the targets' shape (``[N, 1]`` as
    ``[N]``), which ``F.mse_loss`` would otherwise broadcast to ``[N, N]``. A function
    returning (sum, count) already is used as it is.
    """

    loss: Callable[[torch.Tensor, torch.Tensor], Any]

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
        if outputs.numel() == targets.numel():
            outputs = outputs.reshape(targets.shape)
        value = self.loss(outputs, targets)
        if isinstance(value, tuple):
            return value
        return value * len(targets), len(targets)


ACCURACY = Metric("accuracy", accuracy_totals, higher_is_better=True)
LOSSES: dict[str, Loss] = {
    "cross_entropy": masked_cross_entropy,
    "mse": squared_error,
    "mae": absolute_error,
    "bce_with_logits": binary_cross_entropy,
}
METRICS: dict[str, Metric] = {
    "accuracy": ACCURACY,
    "mse": Metric("mse", squared_error_totals, higher_is_better=False),
    "mae": Metric("mae", absolute_error_totals, higher_is_better=False),
    "label_accuracy": Metric("label_accuracy", label_accuracy_totals, higher_is_better=True),
    **{f"{group}_accuracy": Metric(f"{group}_accuracy", ClassGroupAccuracy(*labels), higher_is_better=True)
       for group, labels in EMNIST_CLASS_GROUPS.items()},
}
DEFAULT_METRICS = {
    "cross_entropy": ("accuracy",),
    "mse": ("mse", "mae"),
    "mae": ("mae", "mse"),
    "bce_with_logits": ("label_accuracy",),
}
"""Each named loss's metrics; a loss of one's own reports itself (``loss``) unless given metrics."""
LOSS = "loss"
"""The name under which a task without metrics reports its loss, lower being better."""


@dataclass(frozen=True)
class Task:
    """A loss to train on and the metrics to report, the first primary; the default is the paper's.

    With no metrics, the loss itself is the primary metric (``loss``, lower is better).
    """

    loss: Loss = masked_cross_entropy
    metrics: tuple[Metric, ...] = (ACCURACY,)

    def __post_init__(self) -> None:
        names = [m.name for m in self.metrics]
        if len(set(names)) != len(names) or LOSS in names:
            raise ValueError(f"metrics {names}: expected distinct names, none of them {LOSS!r} (the loss is always "
                             "reported)")

    @property
    def metric_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.metrics) or (LOSS,)

    @property
    def higher_is_better(self) -> dict[str, bool]:
        return {m.name: m.higher_is_better for m in self.metrics} or {LOSS: False}

    @property
    def primary(self) -> str:
        return self.metric_names[0]


CLASSIFICATION = Task()


def zero_output_loss(loss: Loss, output_shape: Sequence[int], targets: Iterable[torch.Tensor]) -> float:
    """The mean loss of all-zero outputs (``output_shape`` per example) on ``targets``, batch by batch.

    A trivial prediction's loss, for the divergence check: ln(C) for cross-entropy over C
    classes, ln 2 per label for BCE, the mean square of the targets for MSE.
    """
    total, counted = 0.0, 0
    with torch.no_grad():
        for y in targets:
            value, count = loss(torch.zeros(len(y), *output_shape), y)
            total += float(value)
            counted += int(count)
    return total / counted if counted else math.nan
