import pytest
import torch

from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.fedprox import proximal_sgd
from fedmeta.algorithms.presets import fedprox


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.bits
def test_fedprox_with_mu_zero_gives_the_bits_of_fedavg(linear_model, initial_weights, clients, optimizer):
    data = clients[2].train

    prox = proximal_sgd(0.1, 0.0, batch_size=1, epochs=2, optimizer=optimizer)(linear_model, initial_weights, data, 3)
    plain = local_sgd(0.1, batch_size=1, epochs=2, optimizer=optimizer)(linear_model, initial_weights, data, 3)

    assert all(torch.equal(prox.delta[k], plain.delta[k]) for k in initial_weights)
    assert prox.metrics == plain.metrics


def test_the_proximal_term_pulls_the_second_step_back_by_lr_squared_mu_times_the_first_gradient(
        linear_model, zero_weights, clients):
    client_b = clients[1]  # x = [1,1], [2,0], [0,2]; y = 0, 0, 1

    prox = proximal_sgd(0.3, 0.5, batch_size=None, steps=2)(linear_model, zero_weights, client_b.train, seed=0)
    plain = local_sgd(0.3, batch_size=None, steps=2)(linear_model, zero_weights, client_b.train, seed=0)

    # step 1 is the same (θ = θ_server, so μ(θ − θ_server) = 0): θ1 = −lr·g0, with the hand
    # gradient at zero weights g0 = W [[−½, ⅙], [½, −⅙]], b [−⅙, ⅙] (see test_client_update).
    # Step 2 adds lr·μ(θ1 − θ0) = −lr²·μ·g0 to the move: the two deltas differ by lr²·μ·g0 = 0.045·g0.
    torch.testing.assert_close(prox.delta["weight"] - plain.delta["weight"],
                               torch.tensor([[-0.0225, 0.0075], [0.0225, -0.0075]]))
    torch.testing.assert_close(prox.delta["bias"] - plain.delta["bias"], torch.tensor([-0.0075, 0.0075]))


def test_fedprox_reports_the_loss_without_its_proximal_term(linear_model, zero_weights, clients):
    update = proximal_sgd(0.3, 100.0, batch_size=None, steps=1)(linear_model, zero_weights, clients[1].train, 0)

    assert update.metrics["train_loss"] == pytest.approx(0.6931471805599453)  # ln 2: every logit is 0


@pytest.mark.parametrize("mu", [-0.1, float("inf"), float("nan")])
def test_fedprox_refuses_a_negative_or_non_finite_mu(mu):
    with pytest.raises(ValueError, match=f"FedProx mu must be >= 0 and finite, got {mu}"):
        proximal_sgd(0.1, mu)


def test_fedprox_preset_is_fedavg_with_a_proximal_client_update():
    algorithm = fedprox(0.01, local_epochs=2, client_lr=0.05)

    assert algorithm.name == "fedprox(mu=0.01,E=2)"
    assert algorithm.client_update.mu == 0.01
    assert (algorithm.client_update.lr, algorithm.client_update.epochs) == (0.05, 2)
