"""Initial and personalized accuracy of a global model (Jiang et al., 2019, Sec. 3).

For each client: evaluate the global weights on its test split (initial); then
personalize a copy on its train split only, evaluating on the test split after each
stage (personalized). Clients count equally in the summaries.

How a client personalizes is the method's own rule, a ``Personalization``: fine-tuning
everything for some epochs (``LocalTraining``, the paper's), or a few steps of SGD
(``AdaptationSteps``, MAML's and Per-FedAvg's). Evaluation is this one path for all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import numpy as np
from torch import nn

from fedmeta.algorithms.client_update import LocalTraining
from fedmeta.data.federated import ClientData, Examples
from fedmeta.evaluation.metrics import evaluate
from fedmeta.evaluation.summary import Summary
from fedmeta.params import Params, client_seed, set_weights


class Personalization(Protocol):
    """A method's personalization rule; picklable, so engines can run it in their workers."""

    def train_epochs(self, model: nn.Module, data: Examples, seed: int) -> Iterator[dict[str, float]]:
        """Trains ``model`` in place on ``data``, yielding after each stage to test (an epoch, a step).

        Every client must have the same number of stages, whatever its size.
        """


@dataclass(frozen=True)
class ClientPersonalization:
    """One client's numbers: ``personalized_*[p]`` is after p+1 stages (fine-tuning epochs, or steps)."""

    client_id: str
    initial_loss: float
    initial_accuracy: float
    personalized_loss: tuple[float, ...]
    personalized_accuracy: tuple[float, ...]


def personalize_client(model: nn.Module, weights: Params, client: ClientData, fine_tune: Personalization,
                       seed: int) -> ClientPersonalization:
    """Evaluates ``weights`` on the client, then personalizes on train only, stage by stage.

    ``fine_tune.train_epochs`` receives ``client.train`` and nothing else; the test split
    is only passed to ``evaluate``, which reads it under ``no_grad``.
    """
    set_weights(model, weights)
    initial = evaluate(model, client.test)
    losses, accuracies = [], []
    for _ in fine_tune.train_epochs(model, client.train, seed):
        after = evaluate(model, client.test)
        losses.append(after.loss)
        accuracies.append(after.accuracy)
    return ClientPersonalization(client.client_id, initial.loss, initial.accuracy, tuple(losses), tuple(accuracies))


@dataclass(frozen=True)
class PersonalizationWork:
    """The engine-facing form: a pure, picklable function of (model, weights, client, seed)."""

    fine_tune: Personalization

    def __call__(self, model: nn.Module, weights: Params, client: ClientData, seed: int) -> ClientPersonalization:
        return personalize_client(model, weights, client, self.fine_tune, seed)


@dataclass(frozen=True)
class PersonalizationReport:
    """Per-client results and their summaries; arrays are ordered like ``clients``."""

    clients: tuple[ClientPersonalization, ...]

    @property
    def client_ids(self) -> list[str]:
        return [c.client_id for c in self.clients]

    @property
    def initial_accuracy(self) -> np.ndarray:
        return np.array([c.initial_accuracy for c in self.clients])

    @property
    def personalized_accuracy(self) -> np.ndarray:
        """``[epochs, clients]``: accuracy after each fine-tuning epoch."""
        return np.array([c.personalized_accuracy for c in self.clients]).T

    @property
    def initial(self) -> Summary:
        return Summary.of(self.initial_accuracy)

    @property
    def personalized(self) -> list[Summary]:
        """One summary per fine-tuning epoch."""
        return [Summary.of(row) for row in self.personalized_accuracy]

    @property
    def share_hurt(self) -> float:
        """Share of clients whose accuracy after the last epoch is below their initial one."""
        return float(np.mean(self.personalized_accuracy[-1] < self.initial_accuracy))

    def metrics(self) -> dict[str, Any]:
        """Flat metrics for ``metrics.jsonl``: ``initial/…``, ``personalized/…``."""
        initial, final = self.initial, self.personalized[-1]
        return {
            "initial/accuracy": initial.mean,
            "initial/accuracy_std": initial.std,
            "initial/loss": float(np.mean([c.initial_loss for c in self.clients])),
            "personalized/accuracy": final.mean,
            "personalized/accuracy_std": final.std,
            "personalized/loss": float(np.mean([c.personalized_loss[-1] for c in self.clients])),
            "personalized/accuracy_by_epoch": [s.mean for s in self.personalized],
            "personalized/share_hurt": self.share_hurt,
            "evaluation/num_clients": len(self.clients),
        }

    def to_json(self) -> dict[str, Any]:
        """Per-client arrays and summaries, for ``evaluation.json`` and plots."""
        return {
            "client_ids": self.client_ids,
            "initial_accuracy": self.initial_accuracy.tolist(),
            "initial_loss": [c.initial_loss for c in self.clients],
            "personalized_accuracy": [list(c.personalized_accuracy) for c in self.clients],
            "personalized_loss": [list(c.personalized_loss) for c in self.clients],
            "summary": {
                "initial": self.initial._asdict(),
                "personalized_by_epoch": [s._asdict() for s in self.personalized],
                "share_hurt": self.share_hurt,
            },
        }


def personalize(weights: Params, clients: Sequence[ClientData], fine_tune: Personalization, *, engine: Any,
                seed: int = 0, round_idx: int = -1) -> PersonalizationReport:
    """Personalization evaluation of ``weights`` over ``clients`` (held-out ones, usually).

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
    return PersonalizationReport(tuple(engine.map(PersonalizationWork(fine_tune), weights, clients, seeds)))
