import pytest
import torch

from fedmeta.algorithms.aggregators import weighted_mean
from fedmeta.algorithms.client_update import ClientUpdate


def update(values, num_examples):
    return ClientUpdate({"w": torch.tensor(values)}, num_examples, {})


def test_weighted_mean_weights_clients_by_examples():
    updates = [update([1.0, 0.0], 1), update([4.0, 3.0], 2)]

    delta, _ = weighted_mean(by="examples").apply(updates, ())

    torch.testing.assert_close(delta["w"], torch.tensor([3.0, 2.0]))  # (1·[1,0] + 2·[4,3]) / 3


def test_weighted_mean_uniform_weights_every_client_once():
    updates = [update([1.0, 0.0], 1), update([4.0, 3.0], 2)]

    delta, _ = weighted_mean(by="uniform").apply(updates, ())

    torch.testing.assert_close(delta["w"], torch.tensor([2.5, 1.5]))  # ([1,0] + [4,3]) / 2


def test_weighted_mean_averages_every_key_and_keeps_shapes():
    updates = [ClientUpdate({"w": torch.ones(2, 3), "b": torch.tensor([2.0])}, 3, {}),
               ClientUpdate({"w": torch.zeros(2, 3), "b": torch.tensor([6.0])}, 1, {})]

    delta, _ = weighted_mean(by="examples").apply(updates, ())

    torch.testing.assert_close(delta["w"], torch.full((2, 3), 0.75))
    torch.testing.assert_close(delta["b"], torch.tensor([3.0]))  # (3·2 + 6) / 4


def test_weighted_mean_of_equal_sized_clients_is_the_same_by_examples_or_uniform():
    updates = [update([0.1, 0.7], 5), update([0.3, -0.2], 5), update([1.1, 0.9], 5)]

    by_examples, _ = weighted_mean(by="examples").apply(updates, ())
    uniform, _ = weighted_mean(by="uniform").apply(updates, ())

    assert torch.equal(by_examples["w"], uniform["w"])


def test_weighted_mean_state_is_empty_and_passed_through():
    aggregator = weighted_mean()

    state = aggregator.init()
    _, after = aggregator.apply([update([1.0], 1)], state)

    assert state == () and after == ()


def test_weighted_mean_rejects_an_unknown_weighting():
    with pytest.raises(ValueError, match="aggregation must be 'examples' or 'uniform', got 'clients'"):
        weighted_mean(by="clients")


def test_weighted_mean_rejects_an_empty_round():
    with pytest.raises(ValueError, match="empty list of client updates"):
        weighted_mean().apply([], ())
