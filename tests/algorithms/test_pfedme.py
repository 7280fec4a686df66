"""pFedMe's client: local steps on the Moreau envelope, by hand on a linear model."""

import math

import pytest
import torch
from torch import nn

from fedmeta.algorithms.pfedme import MoreauEnvelopeTraining
from fedmeta.data.federated import Examples


def test_pfedme_solves_for_the_personal_model_then_moves_the_local_model_toward_it():
    # one minibatch (R = 1) of one example, K = 2 inner steps of α = 0.1, λ = 2, η = 0.25: ηλ = 0.5
    pfedme = MoreauEnvelopeTraining(lr=0.25, lam=2.0, inner_lr=0.1, inner_steps=2, steps=1, batch_size=1)
    weights = {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)}
    data = Examples(torch.tensor([[1.0, 2.0]]), torch.tensor([0]))

    update = pfedme(nn.Linear(2, 2), weights, data, seed=0)

    # θ1 = -α ∇f(0) = 0.1 · (0.5, -0.5) ⊗ (1, 2, [bias 1]); its logits (0.3, -0.3), so ∇f(θ1) = q (-1, 1) ⊗ ...
    # with q = σ(-0.6); θ2 = θ1 - α (∇f(θ1) + λ θ1) = 0.8 θ1 + 0.1 q (1, -1) ⊗ (1, 2, [1]); w = 0 + ηλ θ2
    q = 1 / (1 + math.exp(0.6))
    theta_w = torch.tensor([[0.04 + 0.1 * q, 0.08 + 0.2 * q], [-0.04 - 0.1 * q, -0.08 - 0.2 * q]])
    theta_b = torch.tensor([0.04 + 0.1 * q, -0.04 - 0.1 * q])
    torch.testing.assert_close(update.delta["weight"], 0.5 * theta_w)
    torch.testing.assert_close(update.delta["bias"], 0.5 * theta_b)
    assert update.metrics["num_samples"] == 2  # two gradients of one example


@pytest.mark.parametrize(("setting", "message"), [
    ({"lam": 0.0}, "pFedMe lam must be > 0 and finite, got 0.0"),
    ({"inner_steps": 0}, "inner steps must be >= 1, got 0"),
])
def test_out_of_range_settings_are_refused(setting, message):
    values = {"lr": 0.1, "lam": 1.0, "inner_lr": 0.1, "inner_steps": 1, "steps": 1} | setting

    with pytest.raises(ValueError, match=message):
        MoreauEnvelopeTraining(**values)
