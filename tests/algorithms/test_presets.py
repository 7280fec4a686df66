import pytest
import torch

from fedmeta.algorithms.algorithm import Switch, init_state
from fedmeta.algorithms.presets import centralized, fedavg, fedsgd, reptile, two_stage
from fedmeta.algorithms.client_update import ClientUpdate

WEIGHTS = {"w": torch.tensor([1.0, 2.0])}


def aggregate(algorithm):
    """The aggregated delta of two clients of 1 and 3 examples with deltas [4, 0] and [0, 4]."""
    updates = [ClientUpdate({"w": torch.tensor([4.0, 0.0])}, 1, {}),
               ClientUpdate({"w": torch.tensor([0.0, 4.0])}, 3, {})]
    return algorithm.aggregator.apply(updates, algorithm.aggregator.init())[0]["w"].tolist()


def test_fedsgd_is_one_full_batch_step_averaged_by_examples():
    algorithm = fedsgd(client_lr=0.05)

    update = algorithm.client_update

    assert (update.lr, update.batch_size, update.steps, update.epochs) == (0.05, None, 1, None)
    assert aggregate(algorithm) == [1.0, 3.0]


def test_fedavg_is_e_epochs_averaged_by_examples():
    algorithm = fedavg(local_epochs=5, client_lr=0.02, client_batch_size=20, client_optimizer="adam")

    update = algorithm.client_update

    assert algorithm.name == "fedavg(E=5)"
    assert (update.lr, update.batch_size, update.epochs, update.steps, update.optimizer) == (0.02, 20, 5, None, "adam")
    assert aggregate(algorithm) == [1.0, 3.0]


def test_reptile_is_k_steps_averaged_uniformly():
    algorithm = reptile(local_steps=10, client_lr=0.02, client_batch_size=20)

    update = algorithm.client_update

    assert algorithm.name == "reptile(K=10)"
    assert (update.batch_size, update.epochs, update.steps) == (20, None, 10)
    assert aggregate(algorithm) == [2.0, 2.0]


@pytest.mark.parametrize("preset", [fedsgd, fedavg, reptile, centralized])
def test_presets_default_to_server_sgd_lr_1_which_adds_the_delta(preset):
    server = preset().server_optimizer

    new, _ = server.apply(WEIGHTS, {"w": torch.tensor([0.5, -0.5])}, server.init(WEIGHTS))

    torch.testing.assert_close(new["w"], torch.tensor([1.5, 1.5]))


def test_two_stage_is_fedavg_with_momentum_then_reptile_with_adam():
    schedule = two_stage(100, local_epochs=5, local_steps=10, server_momentum=0.9, reptile_server_lr=1e-3)

    before, after = init_state(schedule, WEIGHTS, 99), init_state(schedule, WEIGHTS, 100)

    assert isinstance(schedule, Switch) and schedule.name == "fedavg(E=5)->reptile(K=10)@100"
    assert before.stage == 0 and set(before.server) == {"velocity"}
    assert after.stage == 1 and set(after.server) == {"step", "m", "v"}


def test_two_stage_server_momentum_follows_its_argument():
    server = two_stage(1, server_lr=0.5, server_momentum=0.5).before.server_optimizer
    state = server.init(WEIGHTS)

    once, state = server.apply(WEIGHTS, {"w": torch.tensor([1.0, 1.0])}, state)
    twice, _ = server.apply(once, {"w": torch.tensor([1.0, 1.0])}, state)

    torch.testing.assert_close(twice["w"], torch.tensor([2.25, 3.25]))  # +0.5·1, then +0.5·(0.5 + 1)


def test_two_stage_rejects_a_switch_before_round_1():
    with pytest.raises(ValueError, match="switch_round must be >= 1, got 0"):
        two_stage(0)


def test_centralized_is_k_steps_on_one_pooled_client():
    algorithm = centralized(local_steps=50, client_lr=0.02, client_batch_size=20)

    update = algorithm.client_update

    assert (update.steps, update.epochs, update.batch_size, update.lr) == (50, None, 20, 0.02)
    assert algorithm.name == "centralized"
