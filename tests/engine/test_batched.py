"""The batched engine: a cohort's plain SGD updates as one vmapped computation, against client by client.

A batched kernel sums in another order than the per-client one, so the updates agree up to
float rounding (``ROUNDING``), not bit for bit; what cannot be batched runs client by client
and keeps its bits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedmeta.algorithms.algorithm import TrainingWork
from fedmeta.algorithms.client_update import local_sgd
from fedmeta.cli import main
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine import ClientFailure, InProcessEngine
from fedmeta.experiment.run import run_experiment
from fedmeta.params import get_weights

from engine_cases import TinyCNN, assert_same_bits, image_clients_by_id

ROUNDING = 1e-6
"""Updates of size ~0.1 in float32: a few ulps, summed over a few dozen steps."""


def without_dropout() -> TinyCNN:
    torch.manual_seed(0)
    model = TinyCNN()
    model.head[1] = nn.Identity()
    return model


def with_dropout() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN()


@pytest.fixture(scope="module")
def clients() -> list[ClientData]:
    """Eight clients of 3 to 30 examples: different numbers of batches, and short last batches."""
    return list(image_clients_by_id().values())


def both(update, clients, model=without_dropout):
    """(client by client, batched) results of one map of ``update`` from the same weights and seeds."""
    weights = get_weights(model())
    seeds = [11 * i for i in range(len(clients))]
    one_by_one = InProcessEngine(model()).map(TrainingWork(update), weights, clients, seeds)
    batched = InProcessEngine(model(), batched=True).map(TrainingWork(update), weights, clients, seeds)
    return one_by_one, batched


@pytest.mark.parametrize("update", [local_sgd(0.1, 4, epochs=2), local_sgd(0.1, None, epochs=1),
                                    local_sgd(0.1, 3, steps=5)], ids=["fedavg-e2", "fedsgd", "reptile-k5"])
def test_the_batched_cohort_takes_each_clients_own_steps(clients, update):
    one_by_one, batched = both(update, clients)

    for alone, together in zip(one_by_one, batched, strict=True):
        assert together.num_examples == alone.num_examples
        assert {k: together.metrics[k] for k in ("num_steps", "num_samples")} == \
               {k: alone.metrics[k] for k in ("num_steps", "num_samples")}
        assert together.metrics["train_loss"] == pytest.approx(alone.metrics["train_loss"], abs=ROUNDING)
        assert max(float(v.abs().max()) for v in alone.delta.values()) > 100 * ROUNDING  # the clients moved
        for key, delta in alone.delta.items():
            torch.testing.assert_close(together.delta[key], delta, rtol=0, atol=ROUNDING)


@pytest.mark.parametrize(("update", "model"), [
    (local_sgd(0.1, 4), with_dropout),  # dropout draws per client: not batched
    (local_sgd(0.1, 4, optimizer="adam"), without_dropout),
    (local_sgd(0.1, 4, loss=lambda out, y: (nn.functional.cross_entropy(out, y, reduction="sum"), len(y))),
     without_dropout),  # a loss of one's own cannot be masked
], ids=["dropout", "adam", "own-loss"])
def test_what_cannot_be_batched_runs_client_by_client_with_its_bits(clients, update, model):
    one_by_one, batched = both(update, clients, model)

    for alone, together in zip(one_by_one, batched, strict=True):
        assert together.metrics == alone.metrics
        assert_same_bits(together.delta, alone.delta)


def test_a_cohort_with_a_client_without_examples_fails_that_client_alone(clients):
    empty = ClientData("empty", Examples(torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long)),
                       clients[0].test)
    engine = InProcessEngine(without_dropout(), batched=True)

    results = engine.map(TrainingWork(local_sgd(0.1, 4)), get_weights(without_dropout()), [clients[0], empty],
                         [1, 2], on_error="collect")

    assert isinstance(results[1], ClientFailure)
    assert str(results[1].error) == "client 'empty': client has no training examples"
    assert results[0].num_examples == clients[0].num_train


def test_a_client_whose_data_breaks_the_batch_fails_alone_when_failures_are_collected(clients):
    wrong_shape = ClientData("wrong", Examples(torch.zeros(4, 1, 5, 5), torch.zeros(4, dtype=torch.long)),
                             clients[0].test)
    engine = InProcessEngine(without_dropout(), batched=True)
    update, weights = TrainingWork(local_sgd(0.1, 4)), get_weights(without_dropout())

    results = engine.map(update, weights, [clients[0], wrong_shape], [1, 2], on_error="collect")

    assert isinstance(results[1], ClientFailure) and results[1].client_id == "wrong"
    (alone,) = InProcessEngine(without_dropout()).map(update, weights, [clients[0]], [1])
    assert_same_bits(results[0].delta, alone.delta)  # the cohort ran client by client
    with pytest.raises(RuntimeError):
        engine.map(update, weights, [clients[0], wrong_shape], [1, 2])


def test_a_batched_run_ends_near_the_per_client_runs_weights(tmp_path, tiny_config):
    alone = run_experiment(tiny_config(tmp_path / "alone"), progress=False)
    batched = run_experiment(tiny_config(tmp_path / "batched", "engine.batched=true"), progress=False)

    assert batched.config.engine.batched
    for key, weight in alone.weights.items():
        torch.testing.assert_close(batched.weights[key], weight, rtol=0, atol=ROUNDING)
    assert [row["client/num_examples"] for row in batched.history] == \
           [row["client/num_examples"] for row in alone.history]
    assert [row["client/train_loss"] for row in batched.history] == \
           pytest.approx([row["client/train_loss"] for row in alone.history], abs=ROUNDING)


@pytest.mark.parametrize(("settings", "message"), [
    (("engine.batched=true", "engine.workers=2"),
     "engine.workers = 2: expected unset or 0 with engine.batched = true (the batched cohort trains in this process)"),
    (("engine.batched=true", "engine.kind=ray", "engine.workers=1"),
     "engine.batched = True: expected false with engine.kind = 'ray'"),
])
def test_a_batched_cohort_on_workers_is_refused_in_one_line(tmp_path, capsys, tiny_settings, settings, message):
    if "engine.kind=ray" in settings:
        pytest.importorskip("ray")

    code = main(["run", "--no-progress", *tiny_settings(tmp_path / "runs", *settings)])

    assert code == 2
    assert capsys.readouterr().err.startswith(f"fedmeta: error: {message}")
    assert not (tmp_path / "runs").exists()
