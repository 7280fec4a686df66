"""The methods ``fedmeta compare`` runs, as data: each one's fixed settings, search grid and cost.

Adding a method is one ``Method`` line in ``METHODS``: its ``algorithm.name``, the settings
it always uses, the grid its hyperparameters are searched over, and how many client
training samples one client uses in a round (what the equal budget counts).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

from fedmeta.experiment.config import AlgorithmConfig


class Knob(NamedTuple):
    """One searched hyperparameter: a config key (``algorithm.mu``) and the values tried.

    ``scaled``: the values are factors of the setting's client lr, so that one grid fits
    the CNN's lr 0.02 and the LSTM's 1.0.
    """

    key: str
    values: tuple[float, ...]
    scaled: bool = False


def epochs_of_data(a: AlgorithmConfig, mean_train: float) -> float:
    """FedAvg, FedProx: ``local_epochs`` passes over the client's train split."""
    return a.local_epochs * mean_train


def local_steps(a: AlgorithmConfig, mean_train: float) -> float:
    """Reptile: ``local_steps`` batches."""
    return a.local_steps * a.client_batch_size


def support_and_query(a: AlgorithmConfig, mean_train: float) -> float:
    """MAML, FOMAML: ``inner_steps`` support batches and one query batch."""
    return (a.inner_steps + 1) * a.client_batch_size


def per_fedavg_steps(a: AlgorithmConfig, mean_train: float) -> float:
    """Per-FedAvg: per step an inner and an outer batch, and a Hessian batch in its HF variant."""
    return a.local_steps * (3 if a.variant == "hf" else 2) * a.client_batch_size


def head_then_body_epochs(a: AlgorithmConfig, mean_train: float) -> float:
    """FedRep: ``head_epochs`` passes for the head, then ``local_epochs`` for the body."""
    return (a.head_epochs + a.local_epochs) * mean_train


def global_and_personal_epochs(a: AlgorithmConfig, mean_train: float) -> float:
    """Ditto: ``local_epochs`` passes for the global model and as many for the personal one."""
    return 2 * a.local_epochs * mean_train


def moreau_steps(a: AlgorithmConfig, mean_train: float) -> float:
    """pFedMe: per local step, ``inner_steps`` gradient steps on one batch."""
    return a.local_steps * a.inner_steps * a.client_batch_size


def nothing(a: AlgorithmConfig, mean_train: float) -> float:
    """Local-only trains no global model."""
    return 0.0


class Method(NamedTuple):
    """A method as the comparison runs it.

    ``fixed`` are ``AlgorithmConfig`` fields; ``samples_per_client`` is a client's
    training samples in one round, from the algorithm config and the mean train size of
    the training clients; ``fine_tune_epochs``, when set, replaces the scale's (local-only
    trains its models from scratch in them); ``personal_head``: the clients keep the
    setting's output layer (``Setting.head``) for themselves.
    """

    name: str
    label: str
    fixed: Mapping[str, Any]
    grid: tuple[Knob, ...]
    samples_per_client: Callable[[AlgorithmConfig, float], float]
    fine_tune_epochs: int | None = None
    personal_head: bool = False


PAPER_SERVER = {"server_optimizer": "sgd", "server_lr": 1.0, "server_momentum": 0.9}
"""Jiang et al.'s FedAvg server: SGD lr 1.0, momentum 0.9. Every method gets this server (MAML's
and FOMAML's with their searched lr, two-stage's second stage the paper's Adam), so that the
comparison is between client updates, not server optimizers: without momentum a method would
take a tenth of FedAvg's server step at the same budget."""

METHODS: dict[str, Method] = {m.name: m for m in (
    Method("fedavg", "FedAvg", {"local_epochs": 1, **PAPER_SERVER},
           (Knob("algorithm.client_lr", (1.0, 3.0), scaled=True),), epochs_of_data),
    Method("fedprox", "FedProx", {"local_epochs": 1, **PAPER_SERVER},
           (Knob("algorithm.mu", (0.01, 0.1)),), epochs_of_data),
    Method("reptile", "Reptile", {"local_steps": 10, **PAPER_SERVER},
           (Knob("algorithm.server_lr", (0.5, 1.0)),), local_steps),
    Method("two_stage", "two-stage (FedAvg, then Reptile)",
           {"local_epochs": 1, "local_steps": 10, "server_lr": 1.0, "server_momentum": 0.9},
           (Knob("algorithm.reptile_server_lr", (0.001, 0.003)),), epochs_of_data),
    Method("fomaml", "FOMAML", {"inner_steps": 3, **PAPER_SERVER},
           (Knob("algorithm.server_lr", (1.0, 5.0), scaled=True),), support_and_query),
    Method("maml", "MAML", {"inner_steps": 3, **PAPER_SERVER},
           (Knob("algorithm.server_lr", (1.0, 5.0), scaled=True),), support_and_query),
    Method("perfedavg", "Per-FedAvg (FO)", {"local_steps": 5, "variant": "fo", "personalization_steps": 3,
                                            **PAPER_SERVER},
           (Knob("algorithm.client_lr", (1.0, 3.0), scaled=True),), per_fedavg_steps),
    Method("ditto", "Ditto", {"local_epochs": 1, **PAPER_SERVER},
           (Knob("algorithm.lam", (0.1, 1.0)),), global_and_personal_epochs),
    Method("fedrep", "FedRep", {"local_epochs": 1, **PAPER_SERVER},
           (Knob("algorithm.head_epochs", (1, 3)),), head_then_body_epochs, personal_head=True),
    Method("fedper", "FedPer", {"local_epochs": 1, **PAPER_SERVER},
           (Knob("algorithm.client_lr", (1.0, 3.0), scaled=True),), epochs_of_data, personal_head=True),
    Method("pfedme", "pFedMe", {"local_steps": 5, "inner_steps": 3, **PAPER_SERVER},
           (Knob("algorithm.lam", (1.0, 15.0)),), moreau_steps),
    Method("scaffold", "SCAFFOLD", {"local_epochs": 1, **PAPER_SERVER},
           (Knob("algorithm.client_lr", (1.0, 3.0), scaled=True),), epochs_of_data),
    Method("local_only", "local only", {},
           (Knob("evaluation.fine_tune_lr", (1.0, 3.0), scaled=True),), nothing, fine_tune_epochs=5),
)}
"""Every method the comparison knows, in the report's order. Two-stage's budget is split in
half between its stages (``plan.rounds_for``); its ``samples_per_client`` is its first stage's."""


def check_methods(names: tuple[str, ...]) -> None:
    """Raises ValueError naming an unknown or repeated method."""
    for name in names:
        if name not in METHODS:
            raise ValueError(f"method {name!r}: expected one of {', '.join(METHODS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"method {repeated[0]!r} is given twice")
    if not names:
        raise ValueError("no method to compare: give at least one of " + ", ".join(METHODS))
