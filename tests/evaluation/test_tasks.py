import math

import pytest
import torch
import torch.nn.functional as F

from fedmeta.algorithms.client_update import masked_cross_entropy
from fedmeta.evaluation.tasks import (
    LOSSES, METRICS, MeanLoss, Metric, Task, absolute_error, binary_cross_entropy, squared_error, zero_output_loss,
)


def test_squared_and_absolute_error_sum_over_targets_and_count_them():
    outputs, targets = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])  # a model's [N, 1] against [N]

    squared, absolute = squared_error(outputs, targets), absolute_error(outputs, targets)

    assert (float(squared[0]), squared[1]) == (5.0, 2)  # 1² + 2²
    assert (float(absolute[0]), absolute[1]) == (3.0, 2)  # 1 + 2
    assert float(squared[0]) / squared[1] == pytest.approx(float(F.mse_loss(outputs.reshape(2), targets)))


def test_binary_cross_entropy_sums_each_labels_loss():
    logits, targets = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[1.0, 0.0]])

    total, count = binary_cross_entropy(logits, targets)

    # label 0: −ln σ(0) = ln 2; label 1, target 0: −ln(1 − σ(ln 3)) = −ln(1/4) = ln 4
    assert count == 2
    assert float(total) == pytest.approx(math.log(2) + math.log(4))


def test_a_loss_refuses_outputs_of_another_size_than_the_targets():
    with pytest.raises(ValueError, match=r"^the model's outputs of shape \(2, 2\) do not match targets of shape "
                                         r"\(3,\)$"):
        squared_error(torch.zeros(2, 2), torch.zeros(3))


def test_accuracy_counts_right_argmax_predictions_and_skips_padding():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0], [5.0, 0.0]])
    targets = torch.tensor([0, 0, 1, -100])

    total, count = METRICS["accuracy"].batch(logits, targets)

    assert (float(total), float(count)) == (2.0, 3.0)


def test_label_accuracy_counts_each_label_on_its_own():
    logits = torch.tensor([[1.0, -1.0], [-2.0, 3.0], [0.5, 0.5]])  # predicted labels [1, 0], [0, 1], [1, 1]
    targets = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])

    total, count = METRICS["label_accuracy"].batch(logits, targets)

    assert total.tolist() == [1.0, 3.0]
    assert count.tolist() == [3.0, 3.0]


def test_a_metric_returning_the_batch_mean_counts_each_example_once():
    per_label_mean = Metric("mean_output", lambda outputs, targets: outputs.mean(0), higher_is_better=True)

    total, count = per_label_mean.batch(torch.tensor([[1.0, 2.0], [3.0, 6.0]]), torch.zeros(2, 2))

    assert total.tolist() == [4.0, 8.0]  # means [2, 4] times 2 examples
    assert count.tolist() == [2.0, 2.0]


def test_a_loss_returning_the_batch_mean_becomes_its_sum_over_examples():
    outputs, targets = torch.tensor([1.0, 3.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])

    total, count = MeanLoss(F.l1_loss)(outputs, targets)

    assert count == 3
    assert float(total) == pytest.approx(3.0)  # mean |error| 1, times 3 examples


def test_a_task_without_metrics_reports_its_loss_lower_being_better():
    task = Task(squared_error, metrics=())

    assert (task.primary, task.higher_is_better) == ("loss", {"loss": False})


def test_a_task_refuses_two_metrics_of_one_name():
    with pytest.raises(ValueError, match=r"^metrics \['mae', 'mae'\]: expected distinct names"):
        Task(metrics=(METRICS["mae"], METRICS["mae"]))


def test_a_metric_name_with_a_slash_is_refused_as_it_names_a_metrics_key():
    with pytest.raises(ValueError, match=r"^metric name 'r2/test': expected a non-empty name without '/'"):
        Metric("r2/test", squared_error, higher_is_better=False)


@pytest.mark.parametrize("loss, shape, targets, expected", [
    (masked_cross_entropy, (3,), [torch.tensor([0, 2]), torch.tensor([1])], math.log(3)),
    (binary_cross_entropy, (2,), [torch.tensor([[1.0, 0.0]])], math.log(2)),
    (squared_error, (1,), [torch.tensor([1.0]), torch.tensor([3.0])], 5.0),  # (1² + 3²) / 2
])
def test_the_loss_of_all_zero_outputs_is_a_trivial_predictions(loss, shape, targets, expected):
    assert zero_output_loss(loss, shape, targets) == pytest.approx(expected)


def test_cross_entropy_is_the_named_default_loss():
    assert Task().loss is LOSSES["cross_entropy"] is masked_cross_entropy
    assert Task().metric_names == ("accuracy",)


def test_a_batch_mean_loss_gets_one_output_per_target_in_the_targets_shape():
    outputs, targets = torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])  # [N, 1] would broadcast to [N, N]

    total, count = MeanLoss(F.mse_loss)(outputs, targets)

    assert (float(total), count) == (5.0, 2)  # mean (1 + 4) / 2, times 2 examples
