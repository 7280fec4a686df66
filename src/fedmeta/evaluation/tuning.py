"""How held-out clients should fine-tune, chosen on training clients alone ("careful fine-tuning").

Jiang et al. (2019) find that personalization needs careful fine-tuning. Each candidate of
``GRID``, an optimizer and its learning rate, fine-tunes the validation clients (a seeded
split of the *training* clients) for up to ``MAX_EPOCHS`` epochs; the candidate and the
epoch count with the best mean personalized value of the task's primary metric win, the
first of equals in grid order and fewer epochs first. Held-out clients are never read
here: they are evaluated once, afterwards, with the winner.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from fedmeta.data.federated import ClientData
from fedmeta.evaluation.personalization import Personalization, personalize
from fedmeta.evaluation.tasks import CLASSIFICATION, Task
from fedmeta.params import Params

GRID: tuple[tuple[str, float], ...] = (
    *(("sgd", lr) for lr in (0.005, 0.01, 0.02, 0.05, 0.1)),
    *(("adam", lr) for lr in (0.0005, 0.001, 0.002, 0.005)),
)
"""(optimizer, learning rate) candidates: the paper's SGD lr 0.02 and Adam lr 0.002, and their neighbours."""
MAX_EPOCHS = 10


class Candidate(NamedTuple):
    """One candidate's mean over the validation clients: before, and after each fine-tuning epoch."""

    optimizer: str
    lr: float
    initial: float
    by_epoch: tuple[float, ...]


class Tuning(NamedTuple):
    """Every candidate, the chosen optimizer, lr and epochs, and the validation clients they were chosen on."""

    candidates: tuple[Candidate, ...]
    optimizer: str
    lr: float
    epochs: int
    metric: str
    client_ids: tuple[str, ...]

    @property
    def score(self) -> float:
        chosen = next(c for c in self.candidates if (c.optimizer, c.lr) == (self.optimizer, self.lr))
        return chosen.by_epoch[self.epochs - 1]

    def to_json(self) -> dict[str, Any]:
        return {"metric": self.metric, "optimizer": self.optimizer, "lr": self.lr, "epochs": self.epochs,
                "validation_client_ids": list(self.client_ids),
                "candidates": [c._asdict() | {"by_epoch": list(c.by_epoch)} for c in self.candidates]}


def tune_fine_tuning(weights: Params, clients: Sequence[ClientData],
                     fine_tuning: Callable[[str, float, int], Personalization], *, engine: Any, seed: int = 0,
                     round_idx: int = -1, task: Task = CLASSIFICATION, grid: Sequence[tuple[str, float]] = GRID,
                     max_epochs: int = MAX_EPOCHS) -> Tuning:
    """Fine-tunes ``clients`` (validation clients, never held-out ones) with every candidate; the best wins.

    ``fine_tuning(optimizer, lr, epochs)`` is the method's personalization rule with those
    settings. A candidate whose metric is not finite (it diverged) never wins.
    """
    metric = task.primary
    sign = 1.0 if task.higher_is_better[metric] else -1.0
    candidates = []
    best: tuple[float, str, float, int] | None = None
    for optimizer, lr in grid:
        report = personalize(weights, clients, fine_tuning(optimizer, lr, max_epochs), engine=engine, seed=seed,
                             round_idx=round_idx, task=task)
        by_epoch = tuple(float(np.mean(row)) for row in report.personalized_of(metric))
        candidates.append(Candidate(optimizer, lr, float(np.mean(report.initial_of(metric))), by_epoch))
        for epochs, value in enumerate(by_epoch, start=1):
            if math.isfinite(value) and (best is None or sign * value > sign * best[0]):
                best = (value, optimizer, lr, epochs)
    if best is None:
        raise ValueError(f"every fine-tuning candidate gave a {metric} that is not finite on the validation clients")
    _, optimizer, lr, epochs = best
    return Tuning(tuple(candidates), optimizer, lr, epochs, metric, tuple(c.client_id for c in clients))
