import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from fedmeta.algorithms.client_update import local_sgd
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine.local import InProcessEngine
from fedmeta.evaluation.metrics import evaluate
from fedmeta.evaluation.tasks import METRICS, Task, binary_cross_entropy, squared_error
from fedmeta.evaluation.personalization import (
    ClientPersonalization, PersonalizationReport, personalize, personalize_client, primary_metric,
)
from fedmeta.params import get_weights

FINE_TUNE = local_sgd(0.5, batch_size=1, epochs=3)


class ReadLog(torch.Tensor):
    """A tensor that records, for every operation on it, whether autograd was on."""

    grad_enabled: list[bool] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.grad_enabled.append(torch.is_grad_enabled())
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


# personalize_client

def test_initial_accuracy_and_loss_are_evaluate_of_the_global_weights(linear_model, initial_weights, clients):
    model = nn.Linear(2, 2)
    expected = [evaluate(linear_model, c.test) for c in clients]

    results = [personalize_client(model, initial_weights, c, FINE_TUNE, seed=0) for c in clients]

    assert [(r.initial_loss, r.initial_accuracy) for r in results] == [(e.loss, e.accuracy) for e in expected]


def test_personalized_accuracy_after_epoch_p_is_evaluate_after_p_epochs_of_training_on_train(
        initial_weights, clients):
    client = clients[2]
    expected = []
    for epochs in (1, 2, 3):  # an E-epoch run's first p epochs are the p-epoch run with the same seed
        model = nn.Linear(2, 2)
        local_sgd(0.5, batch_size=1, epochs=epochs)(model, initial_weights, client.train, seed=5)
        expected.append(evaluate(model, client.test))

    result = personalize_client(nn.Linear(2, 2), initial_weights, client, FINE_TUNE, seed=5)

    assert result.personalized_loss == tuple(e.loss for e in expected)
    assert result.personalized_accuracy == tuple(e.accuracy for e in expected)


@pytest.mark.bits
def test_fine_tuning_gives_the_same_weights_whatever_the_test_split(initial_weights, make_client):
    train = ([[1, 0], [0, 1], [2, 1]], [0, 1, 1])
    one = make_client("same", *train, test_x=[[1, 1]], test_y=[0])
    other = make_client("same", *train, test_x=[[5, -3], [0, 2], [7, 7]], test_y=[1, 1, 0])
    models = [nn.Linear(2, 2), nn.Linear(2, 2)]

    for model, client in zip(models, (one, other)):
        personalize_client(model, initial_weights, client, FINE_TUNE, seed=0)

    first, second = get_weights(models[0]), get_weights(models[1])
    assert not torch.equal(first["weight"], initial_weights["weight"])  # it did fine-tune
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_fine_tuning_reads_the_test_split_only_under_no_grad(initial_weights, clients):
    client = clients[3]
    spied = ClientData(client.client_id, client.train,
                       Examples(client.test.x.as_subclass(ReadLog), client.test.y.as_subclass(ReadLog)))
    ReadLog.grad_enabled = []

    result = personalize_client(nn.Linear(2, 2), initial_weights, spied, FINE_TUNE, seed=0)

    assert len(result.personalized_accuracy) == 3
    assert ReadLog.grad_enabled, "the test split was never read"
    assert not any(ReadLog.grad_enabled), "the test split was read with autograd on"


def test_personalize_never_mutates_the_weights_passed_in(initial_weights, clients):
    before = {k: v.clone() for k, v in initial_weights.items()}
    tensors = dict(initial_weights)

    personalize(initial_weights, clients, FINE_TUNE, engine=InProcessEngine(nn.Linear(2, 2)))

    assert initial_weights.keys() == before.keys()
    assert all(initial_weights[k] is tensors[k] and torch.equal(initial_weights[k], before[k]) for k in before)


def test_personalize_starts_every_client_from_the_weights_not_the_engines_model(initial_weights, clients):
    zeroed = nn.Linear(2, 2)
    nn.init.zeros_(zeroed.weight)

    direct = personalize(initial_weights, clients, FINE_TUNE, engine=InProcessEngine(nn.Linear(2, 2)), seed=1)
    mapped = personalize(initial_weights, clients, FINE_TUNE, engine=InProcessEngine(zeroed), seed=1)

    assert mapped == direct
    assert mapped.client_ids == ["a", "b", "c", "d"]


@pytest.mark.bits
def test_personalize_is_deterministic_given_its_seed(initial_weights, clients):
    first = personalize(initial_weights, clients, FINE_TUNE, engine=InProcessEngine(nn.Linear(2, 2)), seed=2)

    again = personalize(initial_weights, clients, FINE_TUNE, engine=InProcessEngine(nn.Linear(2, 2)), seed=2)

    assert again == first


def test_each_clients_train_size_goes_into_evaluation_json_beside_its_numbers(initial_weights, clients):
    report = personalize(initial_weights, clients, FINE_TUNE, engine=InProcessEngine(nn.Linear(2, 2)))

    assert report.to_json()["client_ids"] == ["a", "b", "c", "d"]
    assert report.to_json()["client_num_train"] == [2, 3, 4, 3]


def test_personalize_needs_at_least_one_client(initial_weights):
    with pytest.raises(ValueError, match="personalization needs at least one client"):
        personalize(initial_weights, [], FINE_TUNE, engine=InProcessEngine(nn.Linear(2, 2)))


def test_personalize_refuses_a_fine_tune_counted_in_steps(initial_weights, clients):
    with pytest.raises(ValueError, match="fine-tunes for a number of epochs, not steps"):
        personalize(initial_weights, clients, local_sgd(0.1, steps=5), engine=InProcessEngine(nn.Linear(2, 2)))


# PersonalizationReport, from hand-made client results

def scored(client_id, initial_loss, initial, personalized_loss, personalized, metric="accuracy"):
    """One client's result for a task of one metric, from plain numbers."""
    return ClientPersonalization(client_id, initial_loss, {metric: initial}, personalized_loss,
                                 tuple({metric: p} for p in personalized))


@pytest.fixture
def report():
    return PersonalizationReport((
        scored("w", 1.0, 0.5, (0.9, 0.8), (0.6, 0.7)),
        scored("x", 2.0, 0.5, (1.9, 2.2), (0.5, 0.4)),   # hurt
        scored("y", 0.5, 0.8, (0.5, 0.5), (0.8, 0.8)),   # unchanged: not hurt
        scored("z", 1.5, 0.6, (1.0, 1.2), (0.7, 0.5)),   # hurt
    ))


def test_report_arrays_are_clients_for_initial_and_epochs_by_clients_for_personalized(report):
    initial, personalized = report.initial_accuracy, report.personalized_accuracy

    assert initial.tolist() == [0.5, 0.5, 0.8, 0.6]
    assert personalized.tolist() == [[0.6, 0.5, 0.8, 0.7], [0.7, 0.4, 0.8, 0.5]]


def test_share_hurt_counts_clients_strictly_worse_after_the_last_epoch(report):
    share = report.share_hurt

    assert share == 0.5  # x (0.4 < 0.5) and z (0.5 < 0.6) of four


def test_report_metrics_by_hand(report):
    metrics = report.metrics()

    assert metrics == {
        "initial/accuracy": pytest.approx(0.6),
        "initial/accuracy_std": pytest.approx(math.sqrt(0.015)),   # (0.01 + 0.01 + 0.04 + 0) / 4
        "initial/loss": pytest.approx(1.25),
        "personalized/accuracy": pytest.approx(0.6),
        "personalized/accuracy_std": pytest.approx(math.sqrt(0.025)),  # (0.01 + 0.04 + 0.04 + 0.01) / 4
        "personalized/loss": pytest.approx(1.175),                # (0.8 + 2.2 + 0.5 + 1.2) / 4
        "personalized/accuracy_by_epoch": [pytest.approx(0.65), pytest.approx(0.6)],
        "personalized/share_hurt": 0.5,
        "evaluation/num_clients": 4,
    }


def test_report_summaries_are_one_per_epoch(report):
    summaries = report.personalized

    assert [s.mean for s in summaries] == pytest.approx([0.65, 0.6])
    assert (summaries[-1].min, summaries[-1].max) == (0.4, 0.8)
    assert report.initial.median == pytest.approx(0.55)


def test_report_to_json_survives_a_json_round_trip(report):
    payload = report.to_json()

    decoded = json.loads(json.dumps(payload))

    assert decoded == payload
    assert decoded["client_ids"] == ["w", "x", "y", "z"]
    assert decoded["personalized_accuracy"][1] == [0.5, 0.4]
    assert decoded["summary"]["share_hurt"] == 0.5
    assert decoded["summary"]["personalized_by_epoch"][0]["mean"] == pytest.approx(0.65)


def test_report_metrics_are_json_serialisable(report):
    metrics = report.metrics()

    decoded = json.loads(json.dumps(metrics))

    assert decoded == metrics
    assert not any(isinstance(v, np.generic) for v in metrics.values())


def test_to_json_of_an_accuracy_report_keeps_the_keys_readers_know(report):
    payload = report.to_json()

    assert list(payload) == ["client_ids", "initial_accuracy", "initial_loss", "personalized_accuracy",
                             "personalized_loss", "summary"]
    assert list(payload["summary"]) == ["initial", "personalized_by_epoch", "share_hurt"]


# a regression task: lower is better, every metric reported

REGRESSION = Task(squared_error, (METRICS["mae"], METRICS["mse"]))


@pytest.fixture
def regression():
    def client(client_id, initial, after):
        return ClientPersonalization(client_id, initial[1], {"mae": initial[0], "mse": initial[1]},
                                     (after[1],), ({"mae": after[0], "mse": after[1]},))

    return PersonalizationReport((
        client("a", (0.5, 0.4), (0.3, 0.2)),
        client("b", (0.2, 0.1), (0.4, 0.05)),  # mae up: hurt by the primary metric; mse down
        client("c", (1.0, 2.0), (1.0, 3.0)),  # mae unchanged: not hurt; mse up
    ), REGRESSION)


def test_a_client_is_hurt_when_the_primary_error_rises(regression):
    assert regression.share_hurt == pytest.approx(1 / 3)  # b
    assert regression.share_hurt_of("mse") == pytest.approx(1 / 3)  # c


def test_a_regression_report_gives_every_metric_with_its_spread(regression):
    metrics = regression.metrics()

    assert metrics == {
        # std² = mean of squares − square of the mean, over the three clients
        "initial/mae": pytest.approx(1.7 / 3), "initial/mae_std": pytest.approx(math.sqrt(1.29 / 3 - (1.7 / 3) ** 2)),
        "initial/mse": pytest.approx(2.5 / 3), "initial/mse_std": pytest.approx(math.sqrt(4.17 / 3 - (2.5 / 3) ** 2)),
        "initial/loss": pytest.approx(2.5 / 3),
        "personalized/mae": pytest.approx(1.7 / 3),
        "personalized/mae_std": pytest.approx(math.sqrt(1.25 / 3 - (1.7 / 3) ** 2)),
        "personalized/mse": pytest.approx(3.25 / 3),
        "personalized/mse_std": pytest.approx(math.sqrt(9.0425 / 3 - (3.25 / 3) ** 2)),
        "personalized/loss": pytest.approx(3.25 / 3),
        "personalized/mae_by_epoch": [pytest.approx(1.7 / 3)], "personalized/mse_by_epoch": [pytest.approx(3.25 / 3)],
        "personalized/share_hurt": pytest.approx(1 / 3), "personalized/mse_share_hurt": pytest.approx(1 / 3),
        "evaluation/num_clients": 3,
    }


def test_a_regression_reports_json_names_its_primary_metric_and_summarizes_the_others(regression):
    payload = json.loads(json.dumps(regression.to_json()))

    assert (payload["primary_metric"], payload["higher_is_better"]) == ("mae", False)
    assert payload["initial_mae"] == [0.5, 0.2, 1.0]
    assert payload["personalized_mse"] == [[0.2], [0.05], [3.0]]
    assert payload["summary"]["share_hurt"] == pytest.approx(1 / 3)
    assert payload["summary"]["metrics"]["mse"]["initial"]["max"] == 2.0


def test_a_per_label_metric_reports_its_mean_over_labels_and_each_label():
    report = PersonalizationReport((
        scored("a", 0.7, (1.0, 0.5), (0.6,), ((1.0, 1.0),), "label_accuracy"),
        scored("b", 0.9, (0.5, 0.0), (0.8,), ((0.5, 0.5),), "label_accuracy"),
    ), Task(binary_cross_entropy, (METRICS["label_accuracy"],)))

    metrics = report.metrics()

    assert metrics["initial/label_accuracy"] == pytest.approx(0.5)  # client means 0.75 and 0.25
    assert metrics["initial/label_accuracy_by_label"] == [0.75, 0.25]
    assert metrics["personalized/label_accuracy_by_label"] == [0.75, 0.75]
    assert report.to_json()["personalized_label_accuracy_by_label"] == [[1.0, 1.0], [0.5, 0.5]]


def test_personalizing_a_regression_client_evaluates_the_task_before_and_after_each_epoch():
    client = ClientData("r", Examples(torch.tensor([[1.0], [2.0]]), torch.tensor([1.0, 3.0])),
                        Examples(torch.tensor([[3.0]]), torch.tensor([4.0])))
    zeros = {"weight": torch.zeros(1, 1), "bias": torch.zeros(1)}
    fine_tune = local_sgd(0.1, batch_size=None, epochs=1, loss=squared_error)

    result = personalize_client(nn.Linear(1, 1), zeros, client, fine_tune, seed=0, task=REGRESSION)

    # before: prediction 0 on the target 4; after the step to w = 0.7, b = 0.4: 2.5, an error of 1.5
    assert (result.initial_loss, result.initial_metrics) == (16.0, {"mae": 4.0, "mse": 16.0})
    assert result.personalized_metrics[0] == pytest.approx({"mae": 1.5, "mse": 2.25})


def test_the_primary_metric_of_a_metrics_row_is_the_first_with_its_spread(report, regression):
    assert [primary_metric(r.metrics()) for r in (report, regression)] == ["accuracy", "mae"]
    assert primary_metric({"round": 3, "client/train_loss": 0.5}) is None


def test_clients_a_metric_does_not_apply_to_count_neither_in_its_mean_nor_in_its_share_hurt():
    task = Task(metrics=(METRICS["accuracy"], METRICS["lower_accuracy"]))

    def client(cid, lower_before, lower_after):
        return ClientPersonalization(cid, 1.0, {"accuracy": 0.5, "lower_accuracy": lower_before}, (0.9,),
                                     ({"accuracy": 0.6, "lower_accuracy": lower_after},))

    report = PersonalizationReport((client("a", 0.4, 0.2), client("b", math.nan, math.nan),
                                    client("c", 0.5, 0.7), client("d", 0.1, 0.3)), task)
    row = report.metrics()

    assert row["initial/lower_accuracy"] == pytest.approx((0.4 + 0.5 + 0.1) / 3)
    assert row["personalized/lower_accuracy"] == pytest.approx((0.2 + 0.7 + 0.3) / 3)
    assert row["personalized/lower_accuracy_share_hurt"] == pytest.approx(1 / 3)  # a, of the three with lower case
    assert row["personalized/share_hurt"] == 0.0
