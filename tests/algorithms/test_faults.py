"""Faulty clients in a round: simulated dropout and stragglers, failures, rejected updates."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fedmeta.algorithms.algorithm import init_state, run_round
from fedmeta.algorithms.faults import Faults
from fedmeta.algorithms.presets import fedavg
from fedmeta.algorithms.server_optimizers import server_sgd
from fedmeta.data.federated import ClientData, Examples
from fedmeta.engine.local import InProcessEngine
from fedmeta.experiment.config import ConfigError, load_config
from fedmeta.experiment.run import run_experiment

SCHEDULE = fedavg(2, client_lr=0.1, client_batch_size=2, server_optimizer=server_sgd(1.0, momentum=0.9))


class RecordingEngine(InProcessEngine):
    """The in-process engine, noting which clients each ``map`` was asked to run."""

    def __init__(self) -> None:
        super().__init__(nn.Linear(2, 2))
        self.calls: list[list[str]] = []

    def map(self, work, weights, clients, seeds, **kwargs):
        self.calls.append([c.client_id for c in clients])
        return super().map(work, weights, clients, seeds, **kwargs)


def one_round(weights, clients, faults=None, *, engine=None, seed=0, round_idx=0):
    state = init_state(SCHEDULE, weights)
    return run_round(SCHEDULE, state, clients, engine=engine or InProcessEngine(nn.Linear(2, 2)), seed=seed,
                     round_idx=round_idx, faults=faults)


def assert_same_bits(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def untimed(metrics):
    return {k: v for k, v in metrics.items() if not k.startswith(("time/", "faults/"))}


def by_id(clients, *ids):
    return [c for c in clients if c.client_id in ids]


# simulated dropout and stragglers

def test_the_dropout_rate_matches_the_probability_within_a_binomial_bound():
    faults = Faults(dropout=0.3)
    n = 10_000

    dropped = sum(faults.drops_out(f"client{i}", seed=0, round_idx=5) for i in range(n))

    # Binomial(10,000, 0.3): mean 3,000, sd √(n·p·(1−p)) = 45.8; 5 sd either side
    assert abs(dropped - 0.3 * n) <= 5 * math.sqrt(n * 0.3 * 0.7)


def test_the_slowdown_is_lognormal_half_the_clients_are_slower_than_examples_times_seconds(make_client):
    faults = Faults(seconds_per_example=0.5, slowdown_sigma=1.0)
    client = make_client("x", [[1, 0], [0, 1]], [0, 1])
    n = 4_000

    times = [faults.simulated_seconds(client, seed=3, round_idx=r) for r in range(n)]

    # the median of exp(σ·z) is 1: Binomial(4,000, ½) above 2 × 0.5 s, 5 sd = 5·√1000 = 158
    assert abs(sum(t > 1.0 for t in times) - n / 2) <= 5 * math.sqrt(n / 4)
    assert len(set(times)) == n  # each round draws afresh


def test_stragglers_are_exactly_the_clients_whose_simulated_time_exceeds_the_deadline(initial_weights, clients):
    # σ = 0: times are examples × 1.5 s: a 3.0, b 4.5, c 6.0, d 4.5; only c is over 4.5
    faults = Faults(seconds_per_example=1.5, round_deadline=4.5)
    engine = RecordingEngine()

    state, metrics = one_round(initial_weights, clients, faults, engine=engine)
    expected, expected_metrics = one_round(initial_weights, by_id(clients, "a", "b", "d"))

    assert engine.calls == [["a", "b", "d"]]  # the straggler never trained
    assert metrics["faults/stragglers"] == 1
    assert metrics["client/num_clients"] == 3 and metrics["client/num_examples"] == 8
    assert_same_bits(state.weights, expected.weights)
    assert untimed(metrics) == untimed(expected_metrics)


def test_dropped_clients_do_not_train_and_the_round_aggregates_the_others(initial_weights, clients):
    faults = Faults(dropout=0.5)
    kept = [c for c in clients if not faults.drops_out(c.client_id, seed=4, round_idx=2)]
    engine = RecordingEngine()

    state, metrics = one_round(initial_weights, clients, faults, engine=engine, seed=4, round_idx=2)
    expected, _ = one_round(initial_weights, kept, seed=4, round_idx=2)

    assert 0 < len(kept) < len(clients)
    assert engine.calls == [[c.client_id for c in kept]]
    assert metrics["faults/dropped"] == len(clients) - len(kept)
    assert_same_bits(state.weights, expected.weights)


# fewer than min_clients: skip or retry

STRAGGLING = {"seconds_per_example": 1.0, "slowdown_sigma": 1.0, "round_deadline": 3.0, "min_clients": 3}
# seed 0, round 0, simulated seconds: attempt 0 a 1.32, b 4.39, c 24.16, d 1.25 (2 back);
#                                     attempt 1 a 0.75, b 0.50, c 20.64, d 2.38 (3 back)


def test_a_round_with_too_few_clients_is_skipped_and_leaves_the_state_as_it_was(initial_weights, clients):
    faults = Faults(**STRAGGLING, policy="skip")
    before = init_state(SCHEDULE, initial_weights)

    state, metrics = one_round(initial_weights, clients, faults)

    assert_same_bits(state.weights, before.weights)
    assert_same_bits(state.server["velocity"], before.server["velocity"])
    assert metrics["faults/skipped"] == 1 and metrics["faults/retries"] == 0
    assert metrics["faults/stragglers"] == 2 and metrics["client/num_clients"] == 2  # a and d: one short
    assert metrics["server/delta_norm"] == 0.0


def test_retry_redraws_the_faults_and_reuses_the_clients_that_already_trained(initial_weights, clients):
    faults = Faults(**STRAGGLING, policy="retry", max_retries=2)
    engine = RecordingEngine()

    state, metrics = one_round(initial_weights, clients, faults, engine=engine)
    expected, _ = one_round(initial_weights, by_id(clients, "a", "b", "d"))

    assert engine.calls == [["a", "d"], ["b"]]
    assert metrics["faults/retries"] == 1 and metrics["faults/skipped"] == 0
    assert metrics["faults/stragglers"] == 1  # of the deciding attempt: c
    assert_same_bits(state.weights, expected.weights)


def test_retries_are_bounded_then_the_round_is_skipped(initial_weights, clients):
    faults = Faults(seconds_per_example=1.0, round_deadline=1.0, policy="retry", max_retries=3)  # all over 1 s

    state, metrics = one_round(initial_weights, clients, faults)

    assert metrics["faults/retries"] == 3 and metrics["faults/skipped"] == 1
    assert metrics["faults/stragglers"] == 4 and metrics["client/num_clients"] == 0
    assert "client/train_loss" not in metrics  # nothing came back to have a loss
    assert_same_bits(state.weights, initial_weights)


# clients that fail or send garbage

def wrong_shape(make_client, client_id="broken"):
    return make_client(client_id, [[1, 0, 0], [0, 1, 0]], [0, 1])  # 3 features into nn.Linear(2, 2)


def test_a_client_that_raises_is_reported_by_id_and_the_others_are_aggregated(initial_weights, clients, make_client):
    cohort = [clients[0], wrong_shape(make_client), *clients[1:]]

    with pytest.warns(RuntimeWarning, match=r"round 1: client 'broken' failed and is left out: RuntimeError: mat1"):
        state, metrics = one_round(initial_weights, cohort, Faults())
    expected, expected_metrics = one_round(initial_weights, clients)

    assert metrics["faults/failed"] == 1 and metrics["faults/failed_clients"] == ["broken"]
    assert_same_bits(state.weights, expected.weights)
    assert untimed(metrics) == untimed(expected_metrics)


def test_a_round_where_every_client_raises_raises_the_first_error(initial_weights, make_client):
    empty = ClientData("f0424_27", Examples(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)),
                       Examples(torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)))

    with pytest.warns(RuntimeWarning), \
            pytest.raises(ValueError, match="client 'f0424_27': client has no training examples"):
        one_round(initial_weights, [empty, wrong_shape(make_client)], Faults())


def test_a_round_whose_only_returning_client_raises_is_skipped_not_raised(initial_weights, clients, make_client):
    faults = Faults(seconds_per_example=1.0, round_deadline=2.5)  # broken: 2 s; c: 4 s, a straggler

    with pytest.warns(RuntimeWarning, match="client 'broken' failed"):
        state, metrics = one_round(initial_weights, [wrong_shape(make_client), clients[2]], faults)

    assert metrics["faults/failed"] == 1 and metrics["faults/stragglers"] == 1 and metrics["faults/skipped"] == 1
    assert_same_bits(state.weights, initial_weights)


def test_a_non_finite_update_is_rejected_and_counted(initial_weights, clients, make_client):
    poisoned = make_client("nan", [[math.nan, 1], [0, 1]], [0, 1])
    infinite = make_client("inf", [[math.inf, 1], [0, 1]], [0, 1])

    state, metrics = one_round(initial_weights, [poisoned, *clients, infinite], Faults())
    expected, _ = one_round(initial_weights, clients)

    assert metrics["faults/rejected"] == 2 and metrics["faults/rejected_clients"] == ["nan", "inf"]
    assert metrics["client/num_clients"] == 4 and math.isfinite(metrics["client/train_loss"])
    assert_same_bits(state.weights, expected.weights)


def test_a_round_whose_every_update_is_non_finite_reports_a_non_finite_loss(initial_weights, make_client):
    poisoned = [make_client(f"nan{i}", [[math.nan, 1], [0, 1]], [0, 1]) for i in range(2)]

    state, metrics = one_round(initial_weights, poisoned, Faults())

    assert metrics["faults/skipped"] == 1 and metrics["faults/rejected"] == 2
    assert math.isnan(metrics["client/train_loss"])  # for the run loop's divergence stop
    assert_same_bits(state.weights, initial_weights)


def test_the_norm_rules_reject_norms_over_the_limit_or_the_factor_times_the_median():
    norms = [1.0, 2.0, 3.0, 100.0, math.nan, math.inf]

    relative = Faults(update_norm_factor=10).accepted(norms)  # median of 1, 2, 3, 100 is 2.5: limit 25
    absolute = Faults(max_update_norm=2.5).accepted(norms)
    both = Faults(max_update_norm=50, update_norm_factor=2).accepted(norms)  # min(50, 5)
    neither = Faults().accepted(norms)

    assert relative == [True, True, True, False, False, False]
    assert absolute == [True, True, False, False, False, False]
    assert both == [True, True, True, False, False, False]
    assert neither == [True, True, True, True, False, False]


def test_an_update_of_absurd_norm_is_rejected(initial_weights, clients, make_client):
    huge = make_client("huge", [[3000, 0], [0, 3000]], [1, 0])  # gradients ~1000× the others'

    state, metrics = one_round(initial_weights, [*clients, huge], Faults(update_norm_factor=10))
    expected, _ = one_round(initial_weights, clients)

    assert metrics["faults/rejected_clients"] == ["huge"]
    assert_same_bits(state.weights, expected.weights)


def test_every_client_is_dropped_a_straggler_failed_rejected_or_aggregated(initial_weights, clients, make_client):
    cohort = [*clients, wrong_shape(make_client), make_client("nan", [[math.nan, 1]], [0]),
              *[make_client(f"extra{i}", [[1, i], [i, 1]], [i % 2, 0]) for i in range(8)]]
    faults = Faults(dropout=0.3, seconds_per_example=1.0, slowdown_sigma=0.5, round_deadline=3.0)

    with pytest.warns(RuntimeWarning, match="client 'broken' failed"):
        _, metrics = one_round(initial_weights, cohort, faults, seed=2)

    parts = ["faults/dropped", "faults/stragglers", "faults/failed", "faults/rejected", "client/num_clients"]
    assert [metrics[k] for k in parts] == [6, 1, 1, 1, 5]  # seed 2: c and extra1, 3-6 drop; extra2 straggles
    assert sum(metrics[k] for k in parts) == len(cohort)


# faults off

@pytest.mark.bits
def test_faults_that_never_fire_give_the_bits_of_a_round_without_faults(initial_weights, clients):
    schedule = fedavg(2, client_lr=0.1, client_batch_size=2, server_optimizer=server_sgd(1.0, momentum=0.9))
    engine = InProcessEngine(nn.Linear(2, 2))
    plain = with_faults = init_state(schedule, initial_weights)
    for round_idx in range(3):
        plain, plain_metrics = run_round(schedule, plain, clients, engine=engine, seed=0, round_idx=round_idx)
        with_faults, metrics = run_round(schedule, with_faults, clients, engine=engine, seed=0,
                                         round_idx=round_idx, faults=Faults(update_norm_factor=100))

        assert_same_bits(with_faults.weights, plain.weights)
        assert_same_bits(with_faults.server["velocity"], plain.server["velocity"])
        assert untimed(metrics) == untimed(plain_metrics)
        assert {k: v for k, v in metrics.items() if k.startswith("faults/")} == {
            "faults/dropped": 0, "faults/stragglers": 0, "faults/failed": 0, "faults/rejected": 0,
            "faults/failed_clients": [], "faults/rejected_clients": [], "faults/retries": 0, "faults/skipped": 0,
        }
        assert not any(k.startswith("faults/") for k in plain_metrics)


# config

def test_the_faults_section_builds_the_rounds_faults():
    config = load_config(None, ["faults.dropout=0.1", "faults.round_deadline=30", "faults.policy=retry",
                                "faults.min_clients=5", "faults.update_norm_factor=20"])

    faults = config.faults

    assert faults == Faults(dropout=0.1, round_deadline=30.0, policy="retry", min_clients=5, update_norm_factor=20.0)


@pytest.mark.parametrize("override, message", [
    ("faults.dropout=1", r"faults.dropout = 1.0: expected a probability in \[0, 1\)"),
    ("faults.dropout=nan", r"faults.dropout = nan: expected a probability in \[0, 1\)"),
    ("faults.round_deadline=0", "faults.round_deadline = 0.0: expected a positive number of simulated seconds"),
    ("faults.policy=wait", "faults.policy = 'wait': expected one of 'skip', 'retry'"),
    ("faults.update_norm_factor=1", r"faults.update_norm_factor = 1.0: expected a factor > 1"),
    ("faults.min_clients=11", r"faults.min_clients = 11: expected at most the cohort size \(10\)"),
    ("faults.max_retries=-1", "faults.max_retries = -1: expected 0 or more"),
])
def test_bad_faults_settings_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_a_configured_run_drops_the_clients_its_faults_draw(tmp_path, tiny_config):
    config = tiny_config(tmp_path, "evaluation.every=3", "evaluation.fine_tune_epochs=1", "faults.dropout=0.5")

    result = run_experiment(config, progress=False)

    faults = config.faults
    cohorts = [result.dataset.sample_cohort(3, 0, r) for r in range(3)]
    expected = [sum(faults.drops_out(c.client_id, 0, r) for c in cohort) for r, cohort in enumerate(cohorts)]
    assert [row["faults/dropped"] for row in result.history] == expected
    assert [row["client/num_clients"] for row in result.history] == [3 - d for d in expected]


def test_the_library_refuses_bad_faults_too():
    with pytest.raises(ValueError, match=r"faults dropout = -0.1: expected a probability in \[0, 1\)"):
        Faults(dropout=-0.1)
