"""Every algorithm trains, and personalizes, on the run's loss."""

import pytest
import torch
from torch import nn

from fedmeta.data.federated import Examples
from fedmeta.evaluation.tasks import squared_error
from fedmeta.experiment.build import build_personalization, build_schedule
from fedmeta.experiment.config import ALGORITHMS, load_config
from fedmeta.params import get_weights


class CountingLoss:
    """Squared error that counts its calls (in this process: the test calls the client update itself)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, outputs, targets):
        self.calls += 1
        return squared_error(outputs, targets)


def settings(name):
    extra = {"two_stage": ["algorithm.switch_round=1"], "fedrep": ["model.personal=['1']"],
             "fedper": ["model.personal=['1']"]}
    return load_config(None, [f"algorithm.name={name}", *extra.get(name, [])])


@pytest.mark.parametrize("name", ALGORITHMS)
def test_every_algorithm_trains_and_personalizes_on_the_given_loss(name):
    config = settings(name)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))  # a body and a head, for FedRep and FedPer
    data = Examples(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([1.0, 2.0, 3.0]))
    training, personalizing = CountingLoss(), CountingLoss()

    algorithm = build_schedule(config.algorithm, config.model.personal, num_clients=4, loss=training).at(0)[1]
    update, weights = algorithm.client_update, get_weights(model)
    if hasattr(update, "for_round"):  # SCAFFOLD's server control variate, zero in the first round
        update = update.for_round(update.init_client_state(weights))
    state = (update.init_client_state(weights),) if hasattr(update, "init_client_state") else ()
    update(model, weights, data, *state, 0)
    list(build_personalization(config, personalizing).train_epochs(model, data, 0))

    assert training.calls > 0
    assert personalizing.calls > 0
