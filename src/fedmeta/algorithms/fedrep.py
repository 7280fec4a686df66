"""FedRep's and FedPer's client updates: a shared body, and a personal head kept by each client.

Collins, Hassani, Mokhtari, Shakkottai. *Exploiting Shared Representations for
Personalized Federated Learning*. ICML 2021, Algorithm 1 (FedRep). Client i, from the
global body φ^t and its own head h_i:

    head: h_i ← head_epochs epochs of SGD on f_i(φ^t, h), over h alone (the body frozen)
    body: φ_i ← local_epochs epochs of SGD on f_i(φ, h_i), over φ alone (the head frozen)

Arivazhagan, Aggarwal, Singh, Choudhary. *Federated Learning with Personalization
Layers*. arXiv:1912.00818, 2019, Algorithm 1 (FedPer): the client trains body and head
together for ``local_epochs`` epochs.

Either sends the body's Δ only (zero for the head), so the server averages bodies and the
global head stays at its initial weights. The personal modules are named by the config
(``model.personal = ["fc2"]``); their weights are the client's state, which is all a
client keeps: 4 bytes per head weight, 1,320 B for the MLP's ``fc2`` on Synthetic (32×10
+ 10 weights), 127,224 B for the FedAvg CNN's last layer on FEMNIST (``classifier.3``),
against 6.8 MB for its whole model (so 433 MB, not 23 GB, for 3,400 writers). A client
never seen starts from the global head. A held-out client fine-tunes the head alone from
the global weights, as FedRep's new clients do (Sec. 5): ``HeadFineTuning``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from fedmeta.algorithms.client_update import ClientUpdate, LocalTraining
from fedmeta.client_work import ClientState
from fedmeta.data.federated import Examples
from fedmeta.params import Params, client_seed, set_weights


def personal_keys(weight_names: Iterable[str], modules: Sequence[str], model: str = "the model") -> tuple[str, ...]:
    """The weights of the personal ``modules``, in the model's order.

    Raises ValueError for a module that holds no weights of the model (a typo, or a
    module of another model), and for modules that leave no weight to share.
    """
    names = list(weight_names)
    holders = sorted({name.rsplit(".", 1)[0] for name in names})
    for module in modules:
        if not any(name.startswith(module + ".") for name in names):
            raise ValueError(f"model.personal = {list(modules)!r}: {model} has no module {module!r} with weights "
                             f"(its modules with weights: {', '.join(holders)})")
    keys = tuple(name for name in names if any(name.startswith(module + ".") for module in modules))
    if len(keys) == len(names):
        raise ValueError(f"model.personal = {list(modules)!r}: every weight of {model} is personal, so clients "
                         "would share nothing; name the head only")
    return keys


@contextlib.contextmanager
def training_only(model: nn.Module, names: Iterable[str]) -> Iterator[None]:
    """Freezes every parameter but ``names`` inside the block: the optimizer skips parameters without gradients."""
    trained = set(names)
    frozen = [p for name, p in model.named_parameters() if name not in trained and p.requires_grad]
    for param in frozen:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in frozen:
            param.requires_grad_(True)


@dataclass(frozen=True)
class PersonalHeadTraining:
    """FedRep (``head_epochs`` set) or FedPer (``head_epochs=None``) on the client's head and the global body.

    ``training`` trains the body (FedRep) or everything (FedPer); FedRep's head takes
    ``head_epochs`` epochs of the same optimizer first. ``train_loss`` is over every epoch.
    """

    training: LocalTraining
    personal: tuple[str, ...]
    head_epochs: int | None = None

    def __post_init__(self) -> None:
        if not self.personal:
            raise ValueError("FedRep and FedPer need the names of the personal modules (model.personal)")
        if self.head_epochs is not None and self.head_epochs < 1:
            raise ValueError(f"head_epochs must be >= 1, got {self.head_epochs}")

    def init_client_state(self, weights: Params) -> ClientState:
        return {k: weights[k].clone() for k in personal_keys(weights, self.personal)}

    def __call__(self, model: nn.Module, weights: Params, data: Examples, state: ClientState,
                 seed: int) -> tuple[ClientUpdate, ClientState]:
        if len(data) == 0:
            raise ValueError("client has no training examples")
        head = personal_keys(weights, self.personal)
        set_weights(model, {**weights, **state})
        epochs = []
        if self.head_epochs is not None:
            head_training = dataclasses.replace(self.training, epochs=self.head_epochs, steps=None)
            with training_only(model, head):
                epochs += head_training.train_epochs(model, data, client_seed(seed, 0, "fedrep/head"))
            with training_only(model, [name for name, _ in model.named_parameters() if name not in head]):
                epochs += self.training.train_epochs(model, data, seed)
        else:
            epochs += self.training.train_epochs(model, data, seed)
        after = model.state_dict()
        delta = {k: torch.zeros_like(w) if k in head else after[k] - w for k, w in weights.items()}
        samples = sum(e["num_samples"] for e in epochs)
        metrics = {"train_loss": sum(e["train_loss"] * e["num_samples"] for e in epochs) / samples,
                   "num_steps": sum(e["num_steps"] for e in epochs), "num_samples": samples}
        return ClientUpdate(delta, len(data), metrics), {k: after[k].clone() for k in head}


@dataclass(frozen=True)
class HeadFineTuning(LocalTraining):
    """A personalization rule: ``LocalTraining`` of the ``personal`` modules alone, the body frozen."""

    personal: tuple[str, ...] = ()

    def train_epochs(self, model: nn.Module, data: Examples, seed: int) -> Iterator[dict[str, float]]:
        with training_only(model, personal_keys(model.state_dict(), self.personal)):
            yield from super().train_epochs(model, data, seed)
