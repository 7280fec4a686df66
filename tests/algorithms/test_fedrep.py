"""FedRep and FedPer: the head kept by the client, the body shared, by hand on a two-layer linear model."""

import math

import pytest
import torch
from torch import nn

from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.fedrep import HeadFineTuning, PersonalHeadTraining, personal_keys
from fedmeta.data.federated import Examples
from fedmeta.params import get_weights, set_weights


class TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 2)
        self.fc2 = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def one_example() -> Examples:
    return Examples(torch.tensor([[1.0, 0.0]]), torch.tensor([0]))


def body_identity() -> dict[str, torch.Tensor]:
    """fc1 = identity, the global head fc2 = 1 everywhere (never used: the client has its own)."""
    return {"fc1.weight": torch.eye(2), "fc1.bias": torch.zeros(2),
            "fc2.weight": torch.ones(2, 2), "fc2.bias": torch.ones(2)}


def zero_head() -> dict[str, torch.Tensor]:
    return {"fc2.weight": torch.zeros(2, 2), "fc2.bias": torch.zeros(2)}


def test_fedrep_trains_the_clients_head_then_the_body_and_sends_the_body_alone():
    fedrep = PersonalHeadTraining(local_sgd(0.1, batch_size=1, epochs=1), ("fc2",), head_epochs=1)

    update, head = fedrep(TwoLayers(), body_identity(), one_example(), zero_head(), seed=0)

    # head step: h = (1, 0), logits 0, ∂L/∂logits = (-0.5, 0.5): W2 = 0.1 · (0.5, -0.5) ⊗ h, b2 = (0.05, -0.05)
    torch.testing.assert_close(head["fc2.weight"], torch.tensor([[0.05, 0.0], [-0.05, 0.0]]))
    torch.testing.assert_close(head["fc2.bias"], torch.tensor([0.05, -0.05]))
    # body step: logits (0.1, -0.1), ∂L/∂logits = q (-1, 1) with q = σ(-0.2); ∂L/∂h = W2ᵀ that = (-0.1 q, 0)
    q = 1 / (1 + math.exp(0.2))
    torch.testing.assert_close(update.delta["fc1.weight"], torch.tensor([[0.01 * q, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(update.delta["fc1.bias"], torch.tensor([0.01 * q, 0.0]))
    assert not update.delta["fc2.weight"].any() and not update.delta["fc2.bias"].any()
    assert update.metrics["num_samples"] == 2


def test_fedper_trains_body_and_head_together():
    fedper = PersonalHeadTraining(local_sgd(0.1, batch_size=1, epochs=1), ("fc2",))

    update, head = fedper(TwoLayers(), body_identity(), one_example(), zero_head(), seed=0)

    # one joint step from the zero head: the body's gradient W2ᵀ ∂L/∂logits is 0, the head moves as in FedRep
    assert not any(d.any() for d in update.delta.values())
    torch.testing.assert_close(head["fc2.weight"], torch.tensor([[0.05, 0.0], [-0.05, 0.0]]))
    torch.testing.assert_close(head["fc2.bias"], torch.tensor([0.05, -0.05]))


def test_a_client_never_seen_starts_from_the_global_head():
    state = PersonalHeadTraining(local_sgd(0.1), ("fc2",)).init_client_state(body_identity())

    assert list(state) == ["fc2.weight", "fc2.bias"] and torch.equal(state["fc2.weight"], torch.ones(2, 2))


def test_held_out_fine_tuning_moves_the_head_alone():
    model = TwoLayers()
    set_weights(model, {**body_identity(), **{"fc2.weight": torch.tensor([[0.05, 0.0], [-0.05, 0.0]]),
                                              "fc2.bias": torch.tensor([0.05, -0.05])}})
    before = get_weights(model)

    list(HeadFineTuning(0.1, 1, epochs=1, personal=("fc2",)).train_epochs(model, one_example(), seed=0))

    after = get_weights(model)
    assert torch.equal(after["fc1.weight"], before["fc1.weight"]) and torch.equal(after["fc1.bias"], before["fc1.bias"])
    assert not torch.equal(after["fc2.bias"], before["fc2.bias"])
    assert all(p.requires_grad for p in model.parameters())  # unfrozen after the rule


@pytest.mark.parametrize(("modules", "message"), [
    (("fc3",), r"model.personal = \['fc3'\]: the model has no module 'fc3' with weights "
               r"\(its modules with weights: fc1, fc2\)"),
    (("fc1", "fc2"), r"model.personal = \['fc1', 'fc2'\]: every weight of the model is personal"),
])
def test_personal_modules_the_model_lacks_or_that_leave_nothing_shared_are_refused(modules, message):
    with pytest.raises(ValueError, match=message):
        personal_keys(body_identity(), modules)
