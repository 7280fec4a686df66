"""MAML and FOMAML on a model whose Hessian is worked out by hand.

``nn.Linear(1, 2, bias=False)`` from zero weights on one example x = 1 of class 0: the
logits are z = w·x, the loss −log softmax(z)₀ has gradient (p − e₀)·x and Hessian
(diag p − p pᵀ)·x², which at w = 0 (p = (½, ½)) is [[¼, −¼], [−¼, ¼]]. With α = ln 3, one
support step lands on w₁ = −α·(−½, ½) = (ln3/2, −ln3/2), where p = (¾, ¼), so the query
gradient is (−¼, ¼).
"""

import math

import pytest
import torch
from torch import nn

from fedmeta.algorithms.client_update import local_sgd, masked_cross_entropy
from fedmeta.algorithms.maml import MetaGradient
from fedmeta.algorithms.presets import fomaml, maml
from fedmeta.data.federated import Examples

LN3 = math.log(3.0)


@pytest.fixture
def one_example() -> Examples:
    return Examples(torch.tensor([[1.0]]), torch.tensor([0]))


@pytest.fixture
def scalar_model() -> nn.Linear:
    return nn.Linear(1, 2, bias=False)


ZERO = {"weight": torch.zeros(2, 1)}


def test_fomaml_sends_minus_the_query_gradient_after_the_support_step(scalar_model, one_example):
    update = MetaGradient(LN3, 1, batch_size=None, second_order=False)(scalar_model, ZERO, one_example, seed=0)

    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.25], [-0.25]]))
    assert update.metrics["train_loss"] == pytest.approx(math.log(4 / 3))  # −log ¾ at the adapted weights


def test_maml_sends_minus_the_query_gradient_through_the_support_step(scalar_model, one_example):
    update = MetaGradient(LN3, 1, batch_size=None)(scalar_model, ZERO, one_example, seed=0)

    # g = (I − α H) g_q, H g_q = [[¼, −¼], [−¼, ¼]]·(−¼, ¼) = (−⅛, ⅛): g = (−¼ + ln3/8, ¼ − ln3/8)
    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.25 - LN3 / 8], [-0.25 + LN3 / 8]]))


def test_maml_differs_from_fomaml_by_exactly_the_hessian_term(scalar_model, one_example):
    second = MetaGradient(LN3, 1, batch_size=None)(scalar_model, ZERO, one_example, seed=0)
    first = MetaGradient(LN3, 1, batch_size=None, second_order=False)(scalar_model, ZERO, one_example, seed=0)

    # Δ_MAML − Δ_FOMAML = α·H·g_q = ln3·(−⅛, ⅛)
    torch.testing.assert_close(second.delta["weight"] - first.delta["weight"], torch.tensor([[-LN3 / 8], [LN3 / 8]]))


def test_fomaml_is_the_query_gradient_where_k_client_sgd_steps_land(linear_model, initial_weights, clients):
    data = clients[2].train

    update = MetaGradient(0.3, 3, batch_size=None, second_order=False)(linear_model, initial_weights, data, seed=0)

    # MAML with the second-order terms dropped: K full-batch SGD steps, then ∇L at θ_K
    adapted = local_sgd(0.3, batch_size=None, steps=3)(linear_model, initial_weights, data, seed=0).delta
    weights = {k: (initial_weights[k] + adapted[k]).requires_grad_() for k in initial_weights}
    loss, count = masked_cross_entropy(torch.func.functional_call(linear_model, weights, (data.x,)), data.y)
    grads = torch.autograd.grad(loss / count, list(weights.values()))
    for key, grad in zip(weights, grads):
        torch.testing.assert_close(update.delta[key], -grad)


def test_maml_over_two_steps_is_the_product_of_the_inner_jacobians_times_the_query_gradient(
        linear_model, initial_weights, clients):
    data, alpha = clients[2].train, 0.3
    shapes = {k: w.shape for k, w in initial_weights.items()}

    def loss_of(flat):
        weights, start = {}, 0
        for key, shape in shapes.items():
            weights[key] = flat[start: start + shape.numel()].reshape(shape)
            start += shape.numel()
        loss, count = masked_cross_entropy(torch.func.functional_call(linear_model, weights, (data.x,)), data.y)
        return loss / count

    update = MetaGradient(alpha, 2, batch_size=None)(linear_model, initial_weights, data, seed=0)

    # θ₁ = θ₀ − α∇L(θ₀), θ₂ = θ₁ − α∇L(θ₁); g = (I − αH(θ₀))(I − αH(θ₁))∇L(θ₂), with H from torch
    theta0 = torch.cat([w.flatten() for w in initial_weights.values()])
    grad = torch.func.grad(loss_of)
    theta1 = theta0 - alpha * grad(theta0)
    theta2 = theta1 - alpha * grad(theta1)
    eye = torch.eye(theta0.numel())
    expected = (eye - alpha * torch.autograd.functional.hessian(loss_of, theta0)) @ (
        eye - alpha * torch.autograd.functional.hessian(loss_of, theta1)) @ grad(theta2)
    torch.testing.assert_close(torch.cat([-update.delta[k].flatten() for k in shapes]), expected)


def test_the_meta_update_depends_on_its_seed_only(clients, initial_weights):
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))  # dropout draws from the global stream
    weights = {"1." + k: v for k, v in initial_weights.items()}
    update = MetaGradient(0.3, 2, batch_size=2)

    torch.manual_seed(1)
    first = update(model, weights, clients[2].train, seed=4)
    torch.manual_seed(2)
    again = update(model, weights, clients[2].train, seed=4)
    other = update(model, weights, clients[2].train, seed=5)

    assert all(torch.equal(first.delta[k], again.delta[k]) for k in weights)
    assert not torch.equal(first.delta["1.weight"], other.delta["1.weight"])


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(inner_lr=0.1, inner_steps=0), "inner steps must be >= 1, got 0"),
    (dict(inner_lr=0.0, inner_steps=1), "inner lr must be > 0 and finite, got 0.0"),
    (dict(inner_lr=0.1, inner_steps=1, batch_size=0), "client batch_size must be >= 1, got 0"),
])
def test_meta_gradient_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaGradient(**kwargs)


def test_presets_name_the_order_and_k():
    assert (maml(3).name, fomaml(2).name) == ("maml(K=3)", "fomaml(K=2)")
    assert (maml(3).client_update.second_order, fomaml(2).client_update.second_order) == (True, False)
