"""Ditto's client: a FedAvg update of the global model and a personal model pulled toward it, by hand."""

import pytest
import torch
from torch import nn

from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.ditto import DittoTraining
from fedmeta.data.federated import Examples


def one_example() -> Examples:
    return Examples(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))


def zeros() -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}


def test_ditto_sends_the_fedavg_delta_and_keeps_the_personal_model_pulled_toward_the_global_one():
    ditto = DittoTraining(local_sgd(0.1, batch_size=1, epochs=1), lam=0.5)
    # logits W x + b = (1, 2) + (1, 0): equal, so softmax (0.5, 0.5) and ∂L/∂logits = (-0.5, 0.5)
    personal = {"weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]), "bias": torch.tensor([1.0, 0.0])}

    update, new_personal = ditto(nn.Linear(2, 2), zeros(), one_example(), personal, seed=0)

    # global, from w = 0 (logits 0, the same ∂L/∂logits): w - 0.1 · (-0.5, 0.5) ⊗ (1, 2)
    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.05, 0.1], [-0.05, -0.1]]))
    torch.testing.assert_close(update.delta["bias"], torch.tensor([0.05, -0.05]))
    # personal: v - 0.1 · (∂L/∂v + λ (v - w)), with λ (v - w) = 0.5 v
    torch.testing.assert_close(new_personal["weight"], torch.tensor([[1.0, 0.1], [-0.05, 0.85]]))
    torch.testing.assert_close(new_personal["bias"], torch.tensor([1.0, -0.05]))
    assert update.metrics["num_samples"] == 2  # one example, trained on twice
    assert personal["weight"][0, 1] == 0.0  # the state passed in is left as it was


def test_a_client_never_seen_starts_its_personal_model_at_the_global_weights():
    weights = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}

    state = DittoTraining(local_sgd(0.1), lam=0.5).init_client_state(weights)

    assert all(torch.equal(state[k], weights[k]) and state[k] is not weights[k] for k in weights)


def test_a_negative_lam_is_refused():
    with pytest.raises(ValueError, match="Ditto lam must be >= 0 and finite, got -1"):
        DittoTraining(local_sgd(0.1), lam=-1)
