"""Per-FedAvg on the hand-worked model of test_maml: ``nn.Linear(1, 2, bias=False)`` at zero
weights, one example x = 1 of class 0, inner step α = ln 3. The inner step lands where
p = (¾, ¼), so the outer gradient is u = (−¼, ¼); the Hessian at zero is [[¼, −¼], [−¼, ¼]],
so H·u = (−⅛, ⅛).
"""

import math

import pytest
import torch
from torch import nn

from fedmeta.algorithms.client_update import local_sgd
from fedmeta.algorithms.maml import MetaGradient
from fedmeta.algorithms.per_fedavg import AdaptationSteps, PerFedAvgTraining
from fedmeta.algorithms.presets import perfedavg
from fedmeta.data.federated import Examples
from fedmeta.engine.local import InProcessEngine
from fedmeta.evaluation.personalization import personalize
from fedmeta.params import get_weights, set_weights

LN3 = math.log(3.0)
ZERO = {"weight": torch.zeros(2, 1)}


@pytest.fixture
def one_example() -> Examples:
    return Examples(torch.tensor([[1.0]]), torch.tensor([0]))


def test_first_order_step_moves_by_beta_against_the_gradient_after_the_inner_step(one_example):
    update = PerFedAvgTraining(0.5, LN3, steps=1, batch_size=None)(nn.Linear(1, 2, bias=False), ZERO, one_example, 0)

    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.125], [-0.125]]))  # −β·u = −½·(−¼, ¼)


def test_hessian_vector_step_subtracts_alpha_times_the_hessian_times_the_gradient(one_example):
    update = PerFedAvgTraining(0.5, LN3, 1, None, "hf")(nn.Linear(1, 2, bias=False), ZERO, one_example, 0)

    # −β(u − αHu) = −½·((−¼, ¼) − ln3·(−⅛, ⅛)) = (⅛ − ln3/16, −⅛ + ln3/16)
    torch.testing.assert_close(update.delta["weight"], torch.tensor([[0.125 - LN3 / 16], [-0.125 + LN3 / 16]]))


@pytest.mark.parametrize(("variant", "second_order"), [("fo", False), ("hf", True)])
def test_one_full_batch_step_is_beta_times_the_maml_update(linear_model, initial_weights, clients, variant,
                                                          second_order):
    data = clients[2].train

    per_fedavg = PerFedAvgTraining(0.4, 0.3, 1, None, variant)(linear_model, initial_weights, data, seed=0)
    meta = MetaGradient(0.3, 1, None, second_order)(linear_model, initial_weights, data, seed=0)

    # with every batch the whole client, D = D′ = D″ is MAML's support and query batch
    for key in initial_weights:
        torch.testing.assert_close(per_fedavg.delta[key], 0.4 * meta.delta[key])


def test_steps_count_and_samples_draw_two_batches_per_first_order_step_three_per_hf_step(
        linear_model, initial_weights, clients):
    data = clients[2].train  # 4 examples: batches of 3 are [3, 1] per shuffle

    fo = PerFedAvgTraining(0.1, 0.1, 2, 3, "fo")(linear_model, initial_weights, data, seed=0)
    hf = PerFedAvgTraining(0.1, 0.1, 2, 3, "hf")(linear_model, initial_weights, data, seed=0)

    assert (fo.metrics["num_steps"], fo.metrics["num_samples"]) == (2, 3 + 1 + 3 + 1)
    assert (hf.metrics["num_steps"], hf.metrics["num_samples"]) == (2, 3 + 1 + 3 + 1 + 3 + 1)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(lr=0.1, inner_lr=0.1, steps=1, variant="so"), r"Per-FedAvg variant must be one of \('fo', 'hf'\), got 'so'"),
    (dict(lr=0.1, inner_lr=0.1, steps=0), "client steps must be >= 1, got 0"),
    (dict(lr=0.1, inner_lr=-1.0, steps=1), "inner lr must be > 0 and finite, got -1.0"),
    (dict(lr=0.0, inner_lr=0.1, steps=1), "client lr must be > 0 and finite, got 0.0"),
])
def test_per_fedavg_refuses_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PerFedAvgTraining(**kwargs)


# personalization: a few SGD steps of α, tested after each

def test_adaptation_steps_end_where_as_many_client_sgd_steps_do(linear_model, initial_weights, clients):
    data = clients[2].train
    expected = local_sgd(0.3, batch_size=2, steps=3)(linear_model, initial_weights, data, seed=9).delta
    set_weights(linear_model, initial_weights)
    stages = list(AdaptationSteps(0.3, steps=3, batch_size=2).train_epochs(linear_model, data, seed=9))

    assert [s["num_samples"] for s in stages] == [2, 2, 2]
    adapted = get_weights(linear_model)
    assert all(torch.equal(adapted[k] - initial_weights[k], expected[k]) for k in initial_weights)


def test_personalization_by_steps_reports_one_number_per_step_for_clients_of_any_size(initial_weights, clients):
    report = personalize(initial_weights, clients, AdaptationSteps(0.5, steps=2, batch_size=1),
                         engine=InProcessEngine(nn.Linear(2, 2)))

    assert report.personalized_accuracy.shape == (2, len(clients))  # clients hold 2, 3, 4 and 3 examples


def test_per_fedavg_preset_averages_client_models_uniformly(initial_weights, clients):
    algorithm = perfedavg(local_steps=3, client_lr=0.05, inner_lr=0.01, variant="hf")
    updates = [algorithm.client_update(nn.Linear(2, 2), initial_weights, c.train, seed=0) for c in clients[:2]]

    delta, _ = algorithm.aggregator.apply(updates, algorithm.aggregator.init())

    assert algorithm.name == "perfedavg-hf(tau=3)"
    torch.testing.assert_close(delta["weight"], (updates[0].delta["weight"] + updates[1].delta["weight"]) / 2)
