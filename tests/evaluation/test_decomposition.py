import pytest
import torch
from torch import nn

from fedmeta.algorithms.client_update import local_sgd, masked_cross_entropy
from fedmeta.evaluation.decomposition import decompose_client_update
from fedmeta.params import norm, set_weights


@pytest.fixture
def five_examples(make_client):
    """One client of 5 examples: batches of 2 make 3 steps per epoch ([2, 2, 1])."""
    return make_client("e", [[1, 0], [0, 1], [2, 1], [1, 2], [3, 0]], [0, 1, 0, 1, 1]).train


@pytest.mark.parametrize(("epochs", "num_steps"), [(1, 3), (2, 6)])
def test_fedsgd_plus_fomaml_terms_equal_the_actual_fedavg_delta(initial_weights, five_examples, epochs, num_steps):
    update = local_sgd(0.1, batch_size=2, epochs=epochs)
    delta = update(nn.Linear(2, 2), initial_weights, five_examples, seed=3).delta

    decomposition = decompose_client_update(nn.Linear(2, 2), initial_weights, five_examples, update, seed=3)

    # θ_0 − θ_K = β (g_FedSGD + Σ_j g_FOMAML(j)), the delta being θ_K − θ_0
    assert len(decomposition.fomaml) == num_steps - 1
    for k in initial_weights:
        torch.testing.assert_close(decomposition.summed()[k], -delta[k] / 0.1)
        torch.testing.assert_close(decomposition.fedavg_gradient[k], -delta[k] / 0.1)


def test_decomposition_holds_for_reptile_steps_that_wrap_into_a_second_epoch(initial_weights, five_examples):
    update = local_sgd(0.2, batch_size=2, steps=4)
    delta = update(nn.Linear(2, 2), initial_weights, five_examples, seed=0).delta

    decomposition = decompose_client_update(nn.Linear(2, 2), initial_weights, five_examples, update, seed=0)

    assert len(decomposition.fomaml) == 3
    for k in initial_weights:
        torch.testing.assert_close(decomposition.summed()[k], -delta[k] / 0.2)


def test_fedsgd_term_is_the_gradient_at_the_server_weights_on_the_first_batch(initial_weights, five_examples):
    update = local_sgd(0.1, batch_size=None, epochs=2)  # full batches, so the first batch is all of it
    model = nn.Linear(2, 2)
    set_weights(model, initial_weights)
    loss, count = masked_cross_entropy(model(five_examples.x), five_examples.y)
    expected = dict(zip(["weight", "bias"], torch.autograd.grad(loss / count, [model.weight, model.bias])))

    decomposition = decompose_client_update(nn.Linear(2, 2), initial_weights, five_examples, update, seed=0)

    for k in expected:
        torch.testing.assert_close(decomposition.fedsgd[k], expected[k])


def test_decomposition_norms_name_each_term_and_measure_it(initial_weights, five_examples):
    update = local_sgd(0.1, batch_size=2, epochs=1)
    decomposition = decompose_client_update(nn.Linear(2, 2), initial_weights, five_examples, update, seed=0)

    norms = decomposition.norms()

    assert list(norms) == ["fedsgd", "fomaml(1)", "fomaml(2)", "fedavg"]
    assert norms["fedsgd"] == norm(decomposition.fedsgd)
    assert norms["fomaml(2)"] == norm(decomposition.fomaml[1])
    assert norms["fedavg"] == pytest.approx(norm(decomposition.summed()), rel=1e-5)


def test_decomposition_norms_by_hand_for_one_step_from_zero(zero_weights, clients):
    client_b = clients[1]  # hand gradient at zero: ∇W = [[−½, ⅙], [½, −⅙]], ∇b = [−⅙, ⅙]
    update = local_sgd(0.3, batch_size=None, steps=1)
    decomposition = decompose_client_update(nn.Linear(2, 2), zero_weights, client_b.train, update, seed=0)

    norms = decomposition.norms()

    expected = (2 * 0.25 + 4 / 36) ** 0.5  # sqrt(½² + ½² + 4·(⅙)²)
    assert norms == {"fedsgd": pytest.approx(expected), "fedavg": pytest.approx(expected, rel=1e-5)}


def test_decomposition_leaves_the_weights_passed_in_untouched(initial_weights, five_examples):
    before = {k: v.clone() for k, v in initial_weights.items()}

    decompose_client_update(nn.Linear(2, 2), initial_weights, five_examples, local_sgd(0.5, 1, epochs=2), seed=0)

    assert all(torch.equal(initial_weights[k], before[k]) for k in before)


def test_decomposition_refuses_a_client_optimizer_other_than_sgd(initial_weights, five_examples):
    update = local_sgd(0.01, batch_size=2, epochs=1, optimizer="adam")

    with pytest.raises(ValueError, match="the decomposition holds for client SGD, not 'adam'"):
        decompose_client_update(nn.Linear(2, 2), initial_weights, five_examples, update, seed=0)
