"""Initial and personalized accuracy of a global model (Jiang et al., 2019, Sec. 3), or any metric of the task.

For each client: evaluate the global weights on its test split (initial); then
personalize a copy on its train split only, evaluating on the test split after each
stage (personalized). Clients count equally in the summaries. Every metric of the task
(``fedmeta.evaluation.tasks``) is reported; a client is hurt when the primary metric
moves against its direction (accuracy down, a loss or an error up).

How a client personalizes is the method's own rule, a ``Personalization``: fine-tuning
everything for some epochs (``LocalTraining``, the paper's), or a few steps of SGD
(``AdaptationSteps``, MAML's and Per-FedAvg's). Evaluation is this one path for all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np
from torch import nn

from fedmeta.algorithms.client_update import LocalTraining
from fedmeta.data.federated import ClientData, Examples
from fedmeta.evaluation.metrics import Value, evaluate
from fedmeta.evaluation.summary import Summary
from fedmeta.evaluation.tasks import CLASSIFICATION, LOSS, Task
from fedmeta.params import Params, client_seed, set_weights


class Personalization(Protocol):
    """A method's personalization rule; picklable, so engines can run it in their workers."""

    def train_epochs(self, model: nn.Module, data: Examples, seed: int) -> Iterator[dict[str, float]]:
        """Trains ``model`` in place on ``data``, yielding after each stage to test (an epoch, a step).

        Every client must have the same number of stages, whatever its size.
        """


@dataclass(frozen=True)
class ClientPersonalization:
    """One client's numbers: ``personalized_*[p]`` is after p+1 stages (fine-tuning epochs, or steps).

    ``initial_metrics`` and each of ``personalized_metrics`` hold every metric of the task by name;
    ``num_train`` is the number of train examples the client fine-tuned on (its size).
    """

    client_id: str
    initial_loss: float
    initial_metrics: dict[str, Value]
    personalized_loss: tuple[float, ...]
    personalized_metrics: tuple[dict[str, Value], ...]
    num_train: int | None = None

    def initial(self, metric: str) -> Value:
        return self.initial_loss if metric == LOSS else self.initial_metrics[metric]

    def personalized(self, metric: str) -> tuple[Value, ...]:
        return self.personalized_loss if metric == LOSS else tuple(m[metric] for m in self.personalized_metrics)

    @property
    def initial_accuracy(self) -> Value:
        return self.initial("accuracy")

    @property
    def personalized_accuracy(self) -> tuple[Value, ...]:
        return self.personalized("accuracy")


def personalize_client(model: nn.Module, weights: Params, client: ClientData, fine_tune: Personalization,
                       seed: int, task: Task = CLASSIFICATION) -> ClientPersonalization:
    """Evaluates ``weights`` on the client, then personalizes on train only, stage by stage.

    ``fine_tune.train_epochs`` receives ``client.train`` and nothing else; the test split
    is only passed to ``evaluate``, which reads it under ``no_grad``.
    """
    set_weights(model, weights)
    initial = evaluate(model, client.test, task=task)
    after = [evaluate(model, client.test, task=task) for _ in fine_tune.train_epochs(model, client.train, seed)]
    return ClientPersonalization(client.client_id, initial.loss, initial.metrics, tuple(a.loss for a in after),
                                 tuple(a.metrics for a in after), client.num_train)


@dataclass(frozen=True)
class PersonalizationWork:
    """The engine-facing form: a pure, picklable function of (model, weights, client, seed)."""

    fine_tune: Personalization
    task: Task = CLASSIFICATION

    def __call__(self, model: nn.Module, weights: Params, client: ClientData, seed: int) -> ClientPersonalization:
        return personalize_client(model, weights, client, self.fine_tune, seed, self.task)


def _per_client(values: Sequence[Value]) -> np.ndarray:
    """One number per client: a per-label metric's mean over its labels."""
    return np.array([np.mean(v) if isinstance(v, tuple) else v for v in values], dtype=np.float64)


@dataclass(frozen=True)
class PersonalizationReport:
    """Per-client results and their summaries, for each metric of ``task``; arrays are ordered like ``clients``.

    ``initial``, ``personalized`` and ``share_hurt`` are the primary metric's (accuracy, by default).
    """

    clients: tuple[ClientPersonalization, ...]
    task: Task = CLASSIFICATION

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    def initial_of(self, metric: str) -> np.ndarray:
        """``[clients]``: the metric before personalizing."""
        return _per_client([c.initial(metric) for c in self.clients])

    def personalized_of(self, metric: str) -> np.ndarray:
        """``[stages, clients]``: the metric after each fine-tuning stage."""
        return np.array([_per_client(c.personalized(metric)) for c in self.clients]).T

    def share_hurt_of(self, metric: str) -> float:
        """Share of clients whose metric after the last stage is worse than their initial one, by its direction.

        Among the clients the metric applies to (not NaN); NaN when it applies to none.
        """
        before, after = self.initial_of(metric), self.personalized_of(metric)[-1]
        applies = ~(np.isnan(before) | np.isnan(after))
        if not applies.any():
            return math.nan
        worse = after < before if self.task.higher_is_better[metric] else after > before
        return float(np.mean(worse[applies]))

    @property
    def initial_accuracy(self) -> np.ndarray:
        return self.initial_of("accuracy")

    @property
    def personalized_accuracy(self) -> np.ndarray:
        """``[epochs, clients]``: accuracy after each fine-tuning epoch."""
        return self.personalized_of("accuracy")

    @property
    def initial(self) -> Summary:
        return Summary.of(self.initial_of(self.task.primary))

    @property
    def personalized(self) -> list[Summary]:
        """One summary per fine-tuning epoch."""
        return [Summary.of(row) for row in self.personalized_of(self.task.primary)]

    @property
    def share_hurt(self) -> float:
        """Share of clients whose primary metric after the last epoch is worse than their initial one."""
        return self.share_hurt_of(self.task.primary)

    def _labels(self, metric: str) -> tuple[list[list[float]], list[list[float]]] | None:
        """A per-label metric's (initial, after the last stage) per client and label; None for another metric."""
        if metric == LOSS or not isinstance(self.clients[0].initial(metric), tuple):
            return None
        return ([list(c.initial(metric)) for c in self.clients],
                [list(c.personalized(metric)[-1]) for c in self.clients])

    def metrics(self) -> dict[str, Any]:
        """Flat metrics for ``metrics.jsonl``: ``initial/<metric>``, ``personalized/<metric>``, each with its spread.

        ``personalized/share_hurt`` is the primary metric's, ``personalized/<metric>_share_hurt``
        another's; a per-label metric adds its mean over clients for each label (``_by_label``).
        """
        names, primary = self.task.metric_names, self.task.primary
        initial = {m: Summary.of(self.initial_of(m)) for m in names}
        personalized = {m: [Summary.of(row) for row in self.personalized_of(m)] for m in names}
        row: dict[str, Any] = {}
        for m in names:
            row.update({f"initial/{m}": initial[m].mean, f"initial/{m}_std": initial[m].std})
        row["initial/loss"] = float(np.mean([c.initial_loss for c in self.clients]))
        for m in names:
            final = personalized[m][-1]
            row.update({f"personalized/{m}": final.mean, f"personalized/{m}_std": final.std})
        row["personalized/loss"] = float(np.mean([c.personalized_loss[-1] for c in self.clients]))
        for m in names:
            row[f"personalized/{m}_by_epoch"] = [s.mean for s in personalized[m]]
        row["personalized/share_hurt"] = self.share_hurt_of(primary)
        for m in names[1:]:
            row[f"personalized/{m}_share_hurt"] = self.share_hurt_of(m)
        for m in names:
            labels = self._labels(m)
            if labels:
                row[f"initial/{m}_by_label"] = np.mean(labels[0], axis=0).tolist()
                row[f"personalized/{m}_by_label"] = np.mean(labels[1], axis=0).tolist()
        row["evaluation/num_clients"] = len(self.clients)
        return row

    def to_json(self) -> dict[str, Any]:
        """Per-client arrays and summaries, for ``evaluation.json`` and plots.

        ``initial_<metric>`` and ``personalized_<metric>`` for each metric; ``summary`` is the
        primary metric's, named by ``primary_metric`` (with its ``higher_is_better``) unless
        it is accuracy (the keys older files lack), the other metrics' under ``summary["metrics"]``;
        ``client_num_train``: each client's train examples (its size), where every result has it.
        """
        names, primary = self.task.metric_names, self.task.primary
        out: dict[str, Any] = {"client_ids": self.client_ids}
        if all(c.num_train is not None for c in self.clients):
            out["client_num_train"] = [c.num_train for c in self.clients]
        out.update({f"initial_{m}": self.initial_of(m).tolist() for m in names if m != LOSS})
        out["initial_loss"] = [c.initial_loss for c in self.clients]
        out.update({f"personalized_{m}": self.personalized_of(m).T.tolist() for m in names if m != LOSS})
        out["personalized_loss"] = [list(c.personalized_loss) for c in self.clients]
        for m in names:
            labels = self._labels(m)
            if labels:
                out[f"initial_{m}_by_label"], out[f"personalized_{m}_by_label"] = labels
        out["summary"] = self._summary(primary)
        if len(names) > 1:
            out["summary"]["metrics"] = {m: self._summary(m) for m in names[1:]}
        if primary != "accuracy":
            out["primary_metric"], out["higher_is_better"] = primary, self.task.higher_is_better[primary]
        return out

    def _summary(self, metric: str) -> dict[str, Any]:
        return {"initial": Summary.of(self.initial_of(metric))._asdict(),
                "personalized_by_epoch": [Summary.of(row)._asdict() for row in self.personalized_of(metric)],
                "share_hurt": self.share_hurt_of(metric)}


def primary_metric(row: Mapping[str, Any]) -> str | None:
    """The primary metric of an evaluated ``metrics.jsonl`` row, or None for a row not evaluated.

    ``PersonalizationReport.metrics`` writes it first: the first ``initial/<m>`` beside its ``_std``.
    """
    return next((key[len("initial/"):] for key in row if key.startswith("initial/") and f"{key}_std" in row), None)


def personalize(weights: Params, clients: Sequence[ClientData], fine_tune: Personalization, *, engine: Any,
                seed: int = 0, round_idx: int = -1, task: Task = CLASSIFICATION) -> PersonalizationReport:
    """Personalization evaluation of ``weights`` over ``clients`` (held-out ones, usually), scored by ``task``.

    ``fine_tune`` is the method's rule: for ``LocalTraining``, its client optimizer and
    number of epochs (its ``epochs``; steps would give clients of other sizes other
    numbers of stages). Only the engine's models change; ``weights`` are read, never written.
    """
    if not clients:
        raise ValueError("personalization needs at least one client")
    if isinstance(fine_tune, LocalTraining) and fine_tune.epochs is None:
        raise ValueError("personalization fine-tunes for a number of epochs, not steps")
    weights = {k: w.detach().clone() for k, w in weights.items()}  # callers may pass live model tensors
    seeds = [client_seed(seed, round_idx, f"personalize/{c.client_id}") for c in clients]
    return PersonalizationReport(tuple(engine.map(PersonalizationWork(fine_tune, task), weights, clients, seeds)), task)
