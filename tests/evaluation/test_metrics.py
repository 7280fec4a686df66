import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.data.federated import IGNORE_INDEX, Examples
from fedmeta.evaluation.metrics import evaluate
from fedmeta.evaluation.tasks import METRICS, Task, binary_cross_entropy
from fedmeta.params import get_weights


@pytest.fixture
def identity_model():
    """``nn.Linear(2, 2)`` whose logits are its inputs."""
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    return model


@pytest.fixture
def three_examples():
    # logits = x: [2, 0] → 0 (right), [0, 1] → 1 (wrong), [1, 3] → 1 (right)
    return Examples(torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]]), torch.tensor([0, 0, 1]))


def hand_loss():
    # −log softmax: log(1 + e^−2) for the two right ones, log(1 + e) for the wrong one
    return (2 * math.log(1 + math.exp(-2)) + math.log(1 + math.e)) / 3


def test_evaluate_gives_mean_loss_and_accuracy_by_hand(identity_model, three_examples):
    result = evaluate(identity_model, three_examples)

    assert result.accuracy == pytest.approx(2 / 3)
    assert result.loss == pytest.approx(hand_loss())


def test_evaluate_does_not_depend_on_its_batch_size(identity_model, three_examples):
    whole = evaluate(identity_model, three_examples)

    one_by_one = evaluate(identity_model, three_examples, batch_size=1)

    assert one_by_one.accuracy == whole.accuracy
    assert one_by_one.loss == pytest.approx(whole.loss)


def test_evaluate_skips_ignore_index_targets(identity_model, three_examples):
    padded = Examples(torch.cat([three_examples.x, torch.tensor([[0.0, 9.0]])]),
                      torch.cat([three_examples.y, torch.tensor([IGNORE_INDEX])]))

    result = evaluate(identity_model, padded, batch_size=2)

    assert result.accuracy == pytest.approx(2 / 3)
    assert result.loss == pytest.approx(hand_loss())


def test_evaluate_counts_every_position_of_a_sequence_but_padding():
    model = nn.Embedding(3, 2)  # token → its logits
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 5.0]]))
    data = Examples(torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, IGNORE_INDEX]]))

    result = evaluate(model, data)

    # [ln 3, 0] → 0 is right with loss ln(4/3); [0, 0] → argmax 0 ≠ 1, loss ln 2
    assert result.accuracy == 0.5
    assert result.loss == pytest.approx((math.log(4 / 3) + math.log(2.0)) / 2)


def test_evaluate_switches_off_dropout_and_leaves_weights_alone(identity_model, three_examples):
    model = nn.Sequential(nn.Dropout(0.9), identity_model).train()
    before = get_weights(model)

    results = [evaluate(model, three_examples) for _ in range(3)]

    assert all(r.accuracy == pytest.approx(2 / 3) and r.loss == pytest.approx(hand_loss()) for r in results)
    assert all(torch.equal(before[k], v) for k, v in get_weights(model).items())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("targets", [torch.zeros(0, dtype=torch.long), torch.tensor([IGNORE_INDEX])])
def test_evaluate_rejects_a_split_with_nothing_to_count(identity_model, targets):
    data = Examples(torch.zeros(len(targets), 2), targets)

    with pytest.raises(ValueError, match="cannot evaluate on a split with no examples"):
        evaluate(identity_model, data)


def test_evaluate_scores_each_label_of_a_multi_label_task_whatever_its_batch_size(identity_model):
    data = Examples(torch.tensor([[1.0, -1.0], [-2.0, 3.0], [0.5, 0.5]]),
                    torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]))  # predicted labels [1, 0], [0, 1], [1, 1]
    task = Task(binary_cross_entropy, (METRICS["label_accuracy"],))

    whole, in_pairs = evaluate(identity_model, data, task=task), evaluate(identity_model, data, batch_size=2, task=task)

    assert whole.metrics == in_pairs.metrics == {"label_accuracy": (1 / 3, 1.0)}
    assert whole.loss == pytest.approx(float(F.binary_cross_entropy_with_logits(data.x, data.y)))
    assert in_pairs.loss == pytest.approx(whole.loss)


def test_each_kind_of_emnist_character_is_scored_on_its_own_targets_and_nan_without_any():
    # argmax predictions 3, 15, 41, 10 for targets 3 (digit, right), 15 (upper, right), 40 (lower, wrong),
    # 12 (upper, wrong)
    predicted, targets = torch.tensor([3, 15, 41, 10]), torch.tensor([3, 15, 40, 12])
    data = Examples(F.one_hot(predicted, 62).float(), targets)
    task = Task(metrics=tuple(METRICS[f"{g}_accuracy"] for g in ("digit", "upper", "lower", "letter")))

    scores = evaluate(nn.Identity(), data, task=task)
    digits_only = evaluate(nn.Identity(), Examples(data.x[:1], targets[:1]), task=task)

    assert scores.metrics == {"digit_accuracy": 1.0, "upper_accuracy": 0.5, "lower_accuracy": 0.0,
                              "letter_accuracy": pytest.approx(1 / 3)}
    assert digits_only.metrics["digit_accuracy"] == 1.0
    assert all(math.isnan(digits_only.metrics[f"{g}_accuracy"]) for g in ("upper", "lower", "letter"))
