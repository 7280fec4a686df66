import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fedmeta.algorithms.algorithm import TrainingWork
from fedmeta.algorithms.client_update import LocalTraining, batch_order, local_sgd, masked_cross_entropy
from fedmeta.data.federated import IGNORE_INDEX, ClientData, Examples
from fedmeta.evaluation.tasks import squared_error

LN2 = math.log(2.0)


# masked_cross_entropy

def test_masked_cross_entropy_sums_losses_and_skips_ignore_index():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [5.0, -5.0]])
    targets = torch.tensor([0, 0, IGNORE_INDEX])

    loss, count = masked_cross_entropy(logits, targets)

    # −log ½ − log ¾ = ln 2 + ln(4/3) = ln(8/3); the third row does not count
    assert count == 2
    assert loss.item() == pytest.approx(math.log(8.0 / 3.0))


def test_masked_cross_entropy_flattens_sequences_of_logits():
    logits = torch.tensor([[[0.0, 0.0], [9.0, 1.0], [0.0, math.log(3.0)]]])  # [N=1, T=3, C=2]
    targets = torch.tensor([[0, IGNORE_INDEX, 1]])

    loss, count = masked_cross_entropy(logits, targets)

    assert count == 2
    assert loss.item() == pytest.approx(math.log(8.0 / 3.0))


def test_masked_cross_entropy_of_only_padding_is_zero_with_zero_count():
    logits = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    targets = torch.tensor([IGNORE_INDEX, IGNORE_INDEX])

    loss, count = masked_cross_entropy(logits, targets)

    assert count == 0
    assert loss.item() == 0.0


# batch_order

def test_batch_order_in_steps_mode_yields_exactly_k_batches_across_epochs():
    generator = torch.Generator().manual_seed(0)

    epochs = list(batch_order(5, 2, generator, steps=7))

    # 5 examples in batches of 2 is [2, 2, 1] per epoch; 7 steps = 3 + 3 + 1
    assert [[len(b) for b in e] for e in epochs] == [[2, 2, 1], [2, 2, 1], [2]]


def test_batch_order_in_epochs_mode_covers_every_index_once_per_epoch():
    generator = torch.Generator().manual_seed(0)

    epochs = list(batch_order(7, 3, generator, epochs=3))

    assert len(epochs) == 3
    for batches in epochs:
        assert [len(b) for b in batches] == [3, 3, 1]
        assert sorted(torch.cat(batches).tolist()) == list(range(7))


def test_batch_order_without_batch_size_yields_one_batch_of_every_example():
    generator = torch.Generator().manual_seed(0)

    epochs = list(batch_order(4, None, generator, steps=2))

    assert [[sorted(b.tolist()) for b in e] for e in epochs] == [[[0, 1, 2, 3]], [[0, 1, 2, 3]]]


def test_batch_order_is_deterministic_given_the_generator_seed():
    def order(seed):
        return [[b.tolist() for b in e] for e in batch_order(10, 3, torch.Generator().manual_seed(seed), epochs=2)]

    first, again, other = order(1), order(1), order(2)

    assert first == again
    assert first != other
    assert first[0] != first[1]  # each epoch is a fresh shuffle


@settings(max_examples=50, deadline=None)
@given(num_examples=st.integers(1, 12), batch_size=st.integers(1, 5) | st.none(), steps=st.integers(1, 15),
       seed=st.integers(0, 2**63 - 1))
def test_batch_order_steps_mode_takes_k_batches_each_a_slice_of_a_fresh_permutation(num_examples, batch_size,
                                                                                    steps, seed):
    generator = torch.Generator().manual_seed(seed)

    epochs = list(batch_order(num_examples, batch_size, generator, steps=steps))

    size = num_examples if batch_size is None else batch_size
    assert sum(len(e) for e in epochs) == steps
    for batches in epochs:
        indices = torch.cat(batches).tolist()
        assert len(set(indices)) == len(indices) and set(indices) <= set(range(num_examples))
        assert all(len(b) == size for b in batches[:-1]) and 1 <= len(batches[-1]) <= size
    for batches in epochs[:-1]:  # every epoch but the last (possibly cut) one is complete
        assert sorted(torch.cat(batches).tolist()) == list(range(num_examples))


# LocalTraining: validation

@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=0.1, epochs=1, steps=1), "exactly one of epochs or steps"),
        (dict(lr=0.1, epochs=None, steps=None), "exactly one of epochs or steps"),
        (dict(lr=0.0), "client lr must be > 0, got 0.0"),
        (dict(lr=-0.5), "client lr must be > 0, got -0.5"),
        (dict(lr=float("nan")), "client lr must be > 0, got nan"),
        (dict(lr=0.1, epochs=0), "client epochs must be >= 1, got 0"),
        (dict(lr=0.1, epochs=None, steps=0), "client steps must be >= 1, got 0"),
        (dict(lr=0.1, batch_size=0), "client batch_size must be >= 1, got 0"),
        (dict(lr=0.1, optimizer="rmsprop"), "client optimizer must be one of .*'rmsprop'"),
    ],
)
def test_local_training_rejects_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LocalTraining(**kwargs)


def test_local_sgd_defaults_to_one_epoch():
    update = local_sgd(0.1)

    settings = (update.epochs, update.steps, update.batch_size, update.optimizer)

    assert settings == (1, None, 20, "sgd")


def test_train_client_names_the_client_that_has_no_training_examples(linear_model, initial_weights, make_client):
    empty = ClientData("f0424_27", Examples(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)),
                       make_client("x", [[1, 0]], [0]).test)
    work = TrainingWork(local_sgd(0.1))

    with pytest.raises(ValueError, match=r"client 'f0424_27': client has no training examples"):
        work(linear_model, initial_weights, empty, 0)


# LocalTraining: the update

def test_full_batch_step_from_zero_weights_moves_by_minus_lr_times_the_hand_gradient(
        linear_model, zero_weights, clients):
    client_b = clients[1]  # x = [1,1], [2,0], [0,2]; y = 0, 0, 1

    update = local_sgd(0.3, batch_size=None, steps=1)(linear_model, zero_weights, client_b.train, seed=0)

    # softmax is ½ everywhere, so ∇W[c] = mean_k (½ − [y_k = c]) x_k:
    # class 0: (−½·[1,1] − ½·[2,0] + ½·[0,2]) / 3 = [−½, ⅙]; class 1 is its negative;
    # ∇b = [(−½ − ½ + ½) / 3, …] = [−⅙, ⅙]. The delta is −0.3 times that.
    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.15, -0.05], [-0.15, 0.05]]))
    torch.testing.assert_close(update.delta["bias"], torch.tensor([0.05, -0.05]))


def test_client_update_reports_examples_steps_samples_and_loss(linear_model, zero_weights, clients):
    client_b = clients[1]

    update = local_sgd(0.3, batch_size=None, steps=1)(linear_model, zero_weights, client_b.train, seed=0)

    assert update.num_examples == 3
    assert update.metrics["num_steps"] == 1
    assert update.metrics["num_samples"] == 3
    assert update.metrics["train_loss"] == pytest.approx(LN2)  # every logit is 0 before the step


def test_client_update_counts_steps_and_samples_over_partial_epochs(linear_model, initial_weights, clients):
    client_b = clients[1]  # 3 examples: batches of 2 are [2, 1] per epoch

    update = local_sgd(0.1, batch_size=2, steps=3)(linear_model, initial_weights, client_b.train, seed=0)

    assert update.metrics["num_steps"] == 3
    assert update.metrics["num_samples"] == 5  # 2 + 1, then 2
    assert update.num_examples == 3


def test_client_at_a_stationary_point_sends_zero_delta_and_loss_ln2_every_epoch(
        linear_model, zero_weights, make_client):
    # at zero weights the two examples' gradients cancel exactly: (½ − 1)·x + (½ − 0)·x = 0
    balanced = make_client("balanced", [[1, 0], [1, 0]], [0, 1])

    update = local_sgd(0.5, batch_size=None, epochs=3)(linear_model, zero_weights, balanced.train, seed=0)

    assert all(torch.equal(d, torch.zeros_like(d)) for d in update.delta.values())
    assert update.metrics == {"train_loss": pytest.approx(LN2), "num_steps": 3, "num_samples": 6}


def test_client_adam_first_step_moves_each_parameter_by_lr_against_the_gradient_sign(
        linear_model, zero_weights, clients):
    client_b = clients[1]  # gradient signs from the hand gradient above

    update = local_sgd(0.01, batch_size=None, steps=1, optimizer="adam")(
        linear_model, zero_weights, client_b.train, seed=0)

    # Adam's first step is lr·g/(|g| + eps) = lr·sign(g) up to eps
    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.01, -0.01], [-0.01, 0.01]]))
    torch.testing.assert_close(update.delta["bias"], torch.tensor([0.01, -0.01]))


def test_client_update_leaves_the_server_weights_untouched(linear_model, initial_weights, clients):
    before = {k: v.clone() for k, v in initial_weights.items()}

    local_sgd(0.5, batch_size=1, epochs=2)(linear_model, initial_weights, clients[2].train, seed=0)

    assert all(torch.equal(initial_weights[k], before[k]) for k in before)


def test_client_update_depends_on_its_seed_only_not_on_the_global_rng(initial_weights, clients):
    # dropout draws from the global stream, which the update seeds from ``seed``
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))
    weights = {"1." + k: v for k, v in initial_weights.items()}
    update = local_sgd(0.5, batch_size=1, epochs=2)

    torch.manual_seed(123)
    first = update(model, weights, clients[2].train, seed=7)
    torch.manual_seed(999)
    again = update(model, weights, clients[2].train, seed=7)
    other = update(model, weights, clients[2].train, seed=8)

    assert all(torch.equal(first.delta[k], again.delta[k]) for k in weights)
    assert first.metrics == again.metrics
    assert not torch.equal(first.delta["1.weight"], other.delta["1.weight"])


def test_client_update_leaves_the_callers_global_random_stream_where_it_was(linear_model, initial_weights, clients):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)

    local_sgd(lr=0.1, batch_size=2, epochs=2)(linear_model, initial_weights, clients[0].train, seed=11)

    assert torch.equal(torch.rand(3), expected)


def test_a_regression_loss_steps_on_the_mean_squared_error_by_hand():
    model = nn.Linear(1, 1)
    zeros = {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)}
    data = Examples(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 3.0]))

    update = local_sgd(0.1, batch_size=None, steps=1, loss=squared_error)(model, zeros, data, seed=0)

    # at zero weights the errors are −1 and −3: ∂/∂w = (2/2)(−1·1 − 3·2) = −7, ∂/∂b = (2/2)(−1 − 3) = −4
    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.7]]))
    torch.testing.assert_close(update.delta["bias"], torch.tensor([0.4]))
    assert update.metrics["train_loss"] == pytest.approx(5.0)  # (1² + 3²) / 2
