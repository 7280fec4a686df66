"""SCAFFOLD (option II): corrected client steps, the clients' and the server's control variates, by hand."""

import pytest
import torch
from torch import nn

from fedmeta.algorithms import presets
from fedmeta.algorithms.aggregators import weighted_mean
from fedmeta.algorithms.algorithm import FederatedAlgorithm, init_state, run_round
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.scaffold import CONTROL, ScaffoldTraining, scaffold_mean
from fedmeta.algorithms.server_optimizers import server_sgd
from fedmeta.client_work import ClientUpdate
from fedmeta.engine import InProcessEngine


def linear(weights):
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(weights["weight"])
        model.bias.copy_(weights["bias"])
    return model


def test_a_client_steps_on_its_gradient_plus_c_minus_ci_and_its_new_ci_is_option_ii(make_client, zero_weights):
    client = make_client("a", [[1, 2]], [0])
    c = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    c_i = {"weight": torch.zeros(2, 2), "bias": torch.full((2,), 2.0)}
    scaffold = ScaffoldTraining(local_sgd(0.1, batch_size=1, epochs=1), control=c)

    update, new_c_i = scaffold(nn.Linear(2, 2), zero_weights, client.train, c_i, seed=0)

    # at w = 0 the logits are equal: ∂L/∂logits = (-0.5, 0.5), so g_W = (-0.5, 0.5) ⊗ (1, 2), g_b = (-0.5, 0.5)
    # y = 0 - 0.1 (g + c - c_i), with c - c_i = 1 on the weight and -2 on the bias
    torch.testing.assert_close(update.delta["weight"], torch.tensor([[-0.05, 0.0], [-0.15, -0.2]]))
    torch.testing.assert_close(update.delta["bias"], torch.tensor([0.25, 0.15]))
    # K = 1: c_i⁺ = c_i - c + (x - y)/η = g, the client's gradient at x; Δc_i = c_i⁺ - c_i
    torch.testing.assert_close(new_c_i["weight"], torch.tensor([[-0.5, -1.0], [0.5, 1.0]]))
    torch.testing.assert_close(new_c_i["bias"], torch.tensor([-0.5, 0.5]))
    torch.testing.assert_close(update.delta[CONTROL + "weight"], torch.tensor([[-0.5, -1.0], [0.5, 1.0]]))
    torch.testing.assert_close(update.delta[CONTROL + "bias"], torch.tensor([-2.5, -1.5]))
    assert c_i["bias"][0] == 2.0  # the state passed in is left as it was


def test_two_rounds_by_hand_move_x_c_and_each_ci(make_client, zero_weights):
    # labels 0, one example each: at equal logits g_W = ((-0.5, 0.5) ⊗ x), g_b = (-0.5, 0.5)
    a, b, c_ = (make_client(name, [x], [0]) for name, x in (("a", [1, 1]), ("b", [-2, -2]), ("c", [2, 0])))
    scaffold = presets.scaffold(num_clients=4, client_lr=0.1, client_batch_size=1)
    engine = InProcessEngine(linear(zero_weights))
    state = init_state(scaffold, zero_weights)
    g = {x: {"weight": torch.tensor([[-0.5 * x[0], -0.5 * x[1]], [0.5 * x[0], 0.5 * x[1]]]),
             "bias": torch.tensor([-0.5, 0.5])} for x in ((1, 1), (-2, -2), (2, 0))}

    after_one, _ = run_round(scaffold, state, [a, b], engine=engine, seed=0, round_idx=0)
    states_one = {k: dict(v) for k, v in engine.client_states().items()}
    after_two, _ = run_round(scaffold, after_one, [a, c_], engine=engine, seed=0, round_idx=1)

    # round 1, c = c_i = 0: x₁ = -0.1 · mean(g_a, g_b); c_i = g_i (K = 1); c₁ = (2/4) · mean(g_a, g_b)
    torch.testing.assert_close(after_one.weights["weight"], torch.tensor([[-0.025, -0.025], [0.025, 0.025]]))
    torch.testing.assert_close(after_one.weights["bias"], torch.tensor([0.05, -0.05]))
    c_one = after_one.server["control"]
    torch.testing.assert_close(c_one["weight"], torch.tensor([[0.125, 0.125], [-0.125, -0.125]]))
    torch.testing.assert_close(c_one["bias"], torch.tensor([-0.25, 0.25]))
    torch.testing.assert_close(states_one["a"], g[(1, 1)])
    torch.testing.assert_close(states_one["b"], g[(-2, -2)])
    # round 2: x₁ leaves the logits of a's and c's inputs equal, so their gradients are g_a and g_c again.
    # a: y = x₁ - 0.1 (g_a + c₁ - g_a) = x₁ - 0.1 c₁, Δc_a = 0; c (new, c_c = 0): y = x₁ - 0.1 (g_c + c₁), Δc_c = g_c
    # x₂ = x₁ - 0.05 (2 c₁ + g_c); c₂ = c₁ + (2/4) · mean(0, g_c) = (g_a + g_b + g_c + 0) / 4, the mean of all four c_i
    torch.testing.assert_close(after_two.weights["weight"], torch.tensor([[0.0125, -0.0375], [-0.0125, 0.0375]]))
    torch.testing.assert_close(after_two.weights["bias"], torch.tensor([0.1, -0.1]))
    c_two = after_two.server["control"]
    torch.testing.assert_close(c_two["weight"], torch.tensor([[-0.125, 0.125], [0.125, -0.125]]))
    torch.testing.assert_close(c_two["bias"], torch.tensor([-0.375, 0.375]))
    states = engine.client_states()
    assert list(states) == ["a", "b", "c"]
    torch.testing.assert_close(states["a"], g[(1, 1)])
    torch.testing.assert_close(states["c"], g[(2, 0)])


@pytest.mark.bits
def test_with_c_and_every_ci_at_zero_the_first_round_is_fedavg_of_the_uniform_mean_bit_for_bit(
        clients, initial_weights, linear_model):
    scaffold = presets.scaffold(num_clients=4, local_epochs=2, client_lr=0.1, client_batch_size=2)
    fedavg = FederatedAlgorithm("fedavg(uniform)", local_sgd(0.1, 2, epochs=2), weighted_mean("uniform"),
                                server_sgd(1.0))
    ran = {}

    for algorithm in (scaffold, fedavg):
        state = init_state(algorithm, initial_weights)
        ran[algorithm.name], _ = run_round(algorithm, state, clients, engine=InProcessEngine(linear_model), seed=3,
                                           round_idx=0)

    expected = ran["fedavg(uniform)"].weights
    assert all(torch.equal(ran["scaffold(E=2)"].weights[k], expected[k]) for k in expected)
    assert not torch.equal(expected["weight"], initial_weights["weight"])


def test_the_server_control_variate_moves_by_the_sampled_share_of_the_clients():
    updates = [ClientUpdate({"w": torch.tensor([1.0]), CONTROL + "w": torch.tensor([2.0])}, 1, {}),
               ClientUpdate({"w": torch.tensor([3.0]), CONTROL + "w": torch.tensor([6.0])}, 5, {})]

    delta, _ = scaffold_mean(num_clients=8).apply(updates, ())

    torch.testing.assert_close(delta["w"], torch.tensor([2.0]))  # uniform, whatever the clients' sizes
    torch.testing.assert_close(delta[CONTROL + "w"], torch.tensor([1.0]))  # (2/8) · mean(2, 6)


def test_a_client_optimizer_other_than_sgd_is_refused():
    with pytest.raises(ValueError, match="SCAFFOLD's control variates assume SGD client steps, got client optimizer "
                                         "'adam'"):
        ScaffoldTraining(local_sgd(0.1, optimizer="adam"))


def test_aggregating_without_the_number_of_training_clients_is_refused():
    update = ClientUpdate({"w": torch.tensor([1.0]), CONTROL + "w": torch.tensor([1.0])}, 1, {})

    with pytest.raises(ValueError, match="SCAFFOLD's server needs the number of training clients N"):
        scaffold_mean(None).apply([update], ())
