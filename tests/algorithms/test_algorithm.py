import math

import pytest
import torch
from torch import nn

from fedmeta.algorithms.algorithm import Switch, init_state, run_round
from fedmeta.algorithms.client_update import masked_cross_entropy
from fedmeta.algorithms.presets import fedavg, fedsgd, reptile
from fedmeta.algorithms.server_optimizers import server_adam, server_sgd
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine.local import InProcessEngine
from fedmeta.params import get_weights, norm, set_weights

METRIC_KEYS = {
    "stage", "client/train_loss", "client/num_clients", "client/num_examples", "server/delta_norm",
    "time/round_seconds", "time/samples_per_second",
}


def run(schedule, weights, clients, *, rounds=1, seed=0, start_round=0):
    """Runs ``rounds`` rounds on a fresh ``nn.Linear(2, 2)``; returns the final state and all metrics."""
    engine = InProcessEngine(nn.Linear(2, 2))
    state = init_state(schedule, weights, start_round)
    history = []
    for round_idx in range(start_round, start_round + rounds):
        state, metrics = run_round(schedule, state, clients, engine=engine, seed=seed, round_idx=round_idx)
        history.append(metrics)
    return state, history


def untimed(history):
    return [{k: v for k, v in m.items() if not k.startswith("time/")} for m in history]


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def equal_clients(make_client):
    """Three clients with 4 train examples each."""
    return [
        make_client("p", [[1, 0], [0, 1], [2, 1], [1, 2]], [0, 1, 0, 1]),
        make_client("q", [[1, 1], [2, 0], [0, 2], [3, 1]], [0, 0, 1, 1]),
        make_client("r", [[0, 3], [1, 0], [2, 2], [0, 1]], [1, 0, 0, 1]),
    ]


# FedSGD

def test_fedsgd_server_step_from_zero_is_minus_lr_times_the_hand_pooled_gradient(zero_weights, clients):
    three = clients[:3]  # 2 + 3 + 4 = 9 examples

    state, _ = run(fedsgd(client_lr=0.9), zero_weights, three)

    # example-weighted mean of client gradients = mean gradient over the 9 pooled examples;
    # at zero weights ∇W[0] = Σ (½ − [y = 0]) x / 9 = ([−½, ½] + [−3/2, ½] + [−1, 1]) / 9
    # = [−⅓, 2/9], ∇W[1] = −∇W[0]; ∇b[0] = (0 − ½ + 0) / 9 = −1/18. Step: −0.9 · ∇.
    torch.testing.assert_close(state.weights["weight"], torch.tensor([[0.3, -0.2], [-0.3, 0.2]]))
    torch.testing.assert_close(state.weights["bias"], torch.tensor([0.05, -0.05]))


def test_fedsgd_server_step_is_minus_lr_times_example_weighted_autograd_gradient(initial_weights, clients):
    model = nn.Linear(2, 2)
    gradients = []
    for client in clients:
        set_weights(model, initial_weights)
        loss, count = masked_cross_entropy(model(client.train.x), client.train.y)
        gradients.append(torch.autograd.grad(loss / count, [model.weight, model.bias]))
    total = sum(c.num_train for c in clients)
    expected = [initial_weights[k] - 0.1 * sum(g[i] * c.num_train / total for g, c in zip(gradients, clients))
                for i, k in enumerate(["weight", "bias"])]

    state, _ = run(fedsgd(client_lr=0.1), initial_weights, clients)

    torch.testing.assert_close(state.weights["weight"], expected[0])
    torch.testing.assert_close(state.weights["bias"], expected[1])


@pytest.mark.parametrize("batch_size", [None, 4, 100])  # 4 is the largest client
@pytest.mark.bits
def test_fedavg_with_one_epoch_of_one_full_batch_equals_fedsgd_bitwise(initial_weights, clients, batch_size):
    fedavg_state, fedavg_history = run(fedavg(1, 0.1, batch_size), initial_weights, clients, rounds=3)

    fedsgd_state, fedsgd_history = run(fedsgd(0.1), initial_weights, clients, rounds=3)

    assert_same_bits(fedavg_state.weights, fedsgd_state.weights)
    assert untimed(fedavg_history) == untimed(fedsgd_history)


# Reptile

@pytest.mark.parametrize(("epochs", "steps"), [(1, 2), (2, 4)])
@pytest.mark.bits
def test_reptile_with_server_sgd_lr_1_equals_fedavg_with_the_same_steps_on_equal_clients(
        initial_weights, equal_clients, epochs, steps):
    # 4 examples in batches of 2: E epochs are 2E steps, in the same shuffled order
    fedavg_state, fedavg_history = run(fedavg(epochs, 0.2, 2), initial_weights, equal_clients, rounds=2)

    reptile_state, reptile_history = run(reptile(steps, 0.2, 2, server_sgd(1.0)), initial_weights,
                                         equal_clients, rounds=2)

    assert_same_bits(reptile_state.weights, fedavg_state.weights)
    assert untimed(reptile_history) == untimed(fedavg_history)


def test_reptile_weights_unequal_clients_uniformly_where_fedavg_weights_by_examples(zero_weights, clients):
    b_and_c = clients[1:3]  # 3 and 4 examples

    reptile_state, _ = run(reptile(1, 0.8, None), zero_weights, b_and_c)
    fedsgd_state, _ = run(fedsgd(0.8), zero_weights, b_and_c)

    # at zero weights client b's mean ∇W[0] is [−3/2, ½]/3 and ∇b[0] = −½/3; client c's is
    # [−1, 1]/4 and 0. Uniform: ∇W[0] = [−3/8, 5/24], ∇b[0] = −1/12; by examples (7):
    # ∇W[0] = [−5/2, 3/2]/7, ∇b[0] = −½/7. Each step is −0.8 times that; class 1 mirrors class 0.
    torch.testing.assert_close(reptile_state.weights["weight"], torch.tensor([[0.3, -1 / 6], [-0.3, 1 / 6]]))
    torch.testing.assert_close(reptile_state.weights["bias"], torch.tensor([1 / 15, -1 / 15]))
    torch.testing.assert_close(fedsgd_state.weights["weight"], torch.tensor([[2 / 7, -1.2 / 7], [-2 / 7, 1.2 / 7]]))
    torch.testing.assert_close(fedsgd_state.weights["bias"], torch.tensor([0.4 / 7, -0.4 / 7]))


# run_round: metrics

def test_run_round_reports_metrics_by_part_with_hand_values(zero_weights, clients):
    three = clients[:3]

    state, (metrics,) = run(fedsgd(0.9), zero_weights, three)

    assert set(metrics) == METRIC_KEYS
    assert metrics["stage"] == 0
    assert metrics["client/num_clients"] == 3
    assert metrics["client/num_examples"] == 9
    assert metrics["client/train_loss"] == pytest.approx(math.log(2.0))  # every logit is 0
    # Δ = [[0.3, −0.2], [−0.3, 0.2]], [0.05, −0.05] (see the hand FedSGD step above)
    assert metrics["server/delta_norm"] == pytest.approx(math.sqrt(0.265), rel=1e-6)
    assert metrics["time/round_seconds"] > 0
    assert metrics["time/samples_per_second"] > 0


def test_run_round_train_loss_weights_clients_by_examples(make_client):
    start = {"weight": torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]), "bias": torch.zeros(2)}
    x = make_client("x", [[1, 0]], [0])                    # logits [ln 3, 0]: loss ln(4/3)
    y = make_client("y", [[0, 1], [0, 2], [0, 3]], [0, 1, 0])  # logits [0, 0]: loss ln 2 each

    _, (metrics,) = run(fedsgd(0.1), start, [x, y])

    assert metrics["client/train_loss"] == pytest.approx((math.log(4 / 3) + 3 * math.log(2.0)) / 4)


def test_run_round_names_the_client_that_has_no_training_examples(initial_weights, clients):
    empty = ClientData("f0424_27", Examples(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)), clients[0].test)

    with pytest.raises(ValueError, match=r"client 'f0424_27': client has no training examples"):
        run(fedavg(1, 0.1, 2), initial_weights, [clients[0], empty])


def test_run_round_leaves_the_previous_state_untouched(initial_weights, clients):
    schedule = fedavg(2, 0.1, 2, server_sgd(1.0, 0.9))
    state = init_state(schedule, initial_weights)
    before = {k: v.clone() for k, v in initial_weights.items()}

    run_round(schedule, state, clients, engine=InProcessEngine(nn.Linear(2, 2)), seed=0, round_idx=0)

    assert_same_bits(state.weights, before)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in state.server["velocity"].values())


# Switch

def test_switch_runs_before_until_the_round_and_after_from_it():
    before, after = fedavg(5), reptile(10)
    schedule = Switch(at_round=3, before=before, after=after)

    stages = [schedule.at(r) for r in range(5)]

    assert stages == [(0, before)] * 3 + [(1, after)] * 2
    assert schedule.name == "fedavg(E=5)->reptile(K=10)@3"


def test_init_state_resumed_after_the_switch_starts_in_the_second_stage(initial_weights):
    schedule = Switch(2, fedavg(2, server_optimizer=server_sgd(1.0, 0.9)), reptile(3, server_optimizer=server_adam()))

    state = init_state(schedule, initial_weights, round_idx=2)

    assert state.stage == 1
    assert set(state.server) == {"step", "m", "v"}


def test_switch_reinitialises_the_server_optimizer_at_the_given_round(initial_weights, clients):
    before = fedavg(1, 0.1, 2, server_sgd(1.0, 0.9))
    after = reptile(3, 0.1, 2, server_adam(0.01))
    schedule = Switch(at_round=2, before=before, after=after)

    switched, history = run(schedule, initial_weights, clients, rounds=3)
    first_two, _ = run(schedule, initial_weights, clients, rounds=2)
    fresh, (fresh_metrics,) = run(after, first_two.weights, clients, start_round=2)

    assert [m["stage"] for m in history] == [0, 0, 1]
    assert switched.stage == 1 and switched.server["step"] == 1  # Adam from scratch, not momentum's state
    # round 2 of the switch is exactly ``after`` started fresh from round 2's weights
    assert_same_bits(switched.weights, fresh.weights)
    assert untimed(history[-1:]) == untimed([{**fresh_metrics, "stage": 1}])


# determinism

@pytest.mark.bits
def test_run_round_is_bit_identical_for_the_same_seed_and_differs_for_another(initial_weights, dataset):
    schedule = Switch(2, fedavg(1, 0.1, 1, server_sgd(1.0, 0.9)), reptile(3, 0.1, 1, server_adam(0.01)))
    clients = dataset.train_clients()

    first, first_history = run(schedule, initial_weights, clients, rounds=3, seed=0)
    again, again_history = run(schedule, initial_weights, clients, rounds=3, seed=0)
    other, _ = run(schedule, initial_weights, clients, rounds=3, seed=1)

    assert_same_bits(first.weights, again.weights)
    assert untimed(first_history) == untimed(again_history)
    assert not torch.equal(first.weights["weight"], other.weights["weight"])


@pytest.mark.bits
def test_run_round_gives_the_same_bits_whatever_model_the_engine_holds(initial_weights, clients):
    # the engine's model is only a worker: its own weights must not leak into the round
    schedule = fedavg(2, 0.1, 2)
    state = init_state(schedule, initial_weights)
    stale = nn.Linear(2, 2)
    set_weights(stale, {"weight": torch.full((2, 2), 9.0), "bias": torch.full((2,), -9.0)})

    fresh_state, _ = run_round(schedule, state, clients, engine=InProcessEngine(nn.Linear(2, 2)), seed=0, round_idx=0)
    stale_state, _ = run_round(schedule, state, clients, engine=InProcessEngine(stale), seed=0, round_idx=0)

    assert_same_bits(fresh_state.weights, stale_state.weights)
    assert norm(get_weights(stale)) < 9.0  # the worker was overwritten with client weights
