import torch
from torch import nn

from fedmeta.algorithms.client_update import local_sgd
from fedmeta.data.federated import Examples
from fedmeta.engine import Execution
from fedmeta.params import get_weights


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_bfloat16_steps_train_on_the_updated_weights_not_the_first_steps():
    torch.manual_seed(0)
    data = Examples(torch.randn(64, 8), torch.randint(0, 3, (64,)))
    model = nn.Linear(8, 3)
    weights = get_weights(model)
    update = local_sgd(2.0, batch_size=None, epochs=5)  # 5 full-batch steps, large enough to move the gradient
    full = update(model, weights, data, seed=0).delta["weight"]
    first_step = update.__class__(lr=2.0, batch_size=None, epochs=1)(model, weights, data, seed=0).delta["weight"]

    with Execution(bfloat16=True).context():
        half = update(model, weights, data, seed=0).delta["weight"]

    assert relative_error(half, full) < 0.05
    assert relative_error(5 * first_step, full) > 0.2  # what reusing the first step's weights would give
