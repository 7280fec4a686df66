"""Runs with ``[privacy]``: ε after every round, clipping in the run, same bits, exact resume, Poisson cohorts."""

import json

import pytest
import torch

import fedmeta.experiment.run as run_module
from fedmeta.experiment.build import build_initial_model
from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.config import load_config
from fedmeta.experiment.run import evaluate_checkpoint, resume_experiment, run_experiment

dp_accounting = pytest.importorskip("dp_accounting")

from dp_accounting import dp_event  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402

from fedmeta.algorithms.accounting import calibrate_noise_multiplier  # noqa: E402
from run_cases import without_times  # noqa: E402

# the tiny experiment (9 training clients, cohorts of 3) with adaptive clipping, whose C is aggregator state,
# and server momentum; checkpoints after rounds 2, 4 and 5
PRIVATE = ("rounds=5", "checkpoint_every=2", "algorithm.server_momentum=0.9", "evaluation.fine_tune_epochs=1",
           "privacy.noise_multiplier=0.8", "privacy.clip=0.3", "privacy.delta=0.01", "privacy.target_quantile=0.5",
           "privacy.clipped_count_stddev=1.0")


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_checkpoint(found, expected):
    assert found.rounds_done == expected.rounds_done
    assert found.state.aggregator == expected.state.aggregator  # C and the rounds released
    for key, weight in expected.state.weights.items():
        assert torch.equal(found.state.weights[key], weight)
        assert torch.equal(found.state.server["velocity"][key], expected.state.server["velocity"][key])


@pytest.fixture(scope="module")
def private_run(tmp_path_factory, tiny_config):
    return run_experiment(tiny_config(tmp_path_factory.mktemp("private"), *PRIVATE), progress=False)


def test_every_row_records_epsilon_as_dp_accounting_gives_it(private_run):
    rows = rows_of(private_run.run_dir)
    summary = json.loads((private_run.run_dir / "evaluation.json").read_text())["privacy"]

    expected = []
    for rounds in range(1, 6):  # 3 of 9 clients without replacement: the replace-one Gaussian of multiplier z/2
        accountant = rdp_privacy_accountant.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        event = dp_event.SampledWithoutReplacementDpEvent(9, 3, dp_event.GaussianDpEvent(0.8 / 2))
        expected.append(accountant.compose(event, rounds).get_epsilon(0.01))
    assert [row["privacy/epsilon"] for row in rows] == expected
    assert summary["epsilon"] == expected[-1] and summary["delta"] == 0.01 and summary["noise_multiplier"] == 0.8
    assert len({row["privacy/clip"] for row in rows}) > 1  # adaptive clipping moved C


@pytest.mark.bits
def test_the_same_seed_gives_the_same_bits(private_run, tmp_path, tiny_config):
    again = run_experiment(tiny_config(tmp_path, *PRIVATE), progress=False)

    assert_same_checkpoint(read_checkpoint(again.run_dir / "checkpoint.pt"),
                           read_checkpoint(private_run.run_dir / "checkpoint.pt"))
    assert without_times(rows_of(again.run_dir)) == without_times(rows_of(private_run.run_dir))


@pytest.mark.bits
def test_a_resumed_private_run_ends_with_the_same_bits(private_run, tmp_path, monkeypatch, tiny_config,
                                                       crash_at_round):
    crash_at_round(3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path, *PRIVATE), progress=False)
    monkeypatch.undo()
    (run_dir,) = tmp_path.iterdir()

    resume_experiment(run_dir, progress=False)

    assert_same_checkpoint(read_checkpoint(run_dir / "checkpoint.pt"),
                           read_checkpoint(private_run.run_dir / "checkpoint.pt"))
    assert without_times(rows_of(run_dir)) == without_times(rows_of(private_run.run_dir))
    assert (json.loads((run_dir / "evaluation.json").read_text())
            == json.loads((private_run.run_dir / "evaluation.json").read_text()))


def test_a_private_checkpoint_can_be_evaluated(private_run):
    _, report = evaluate_checkpoint(private_run.run_dir)

    assert report.metrics() == private_run.report.metrics()


def test_the_run_clips_every_update(tmp_path, tiny_config):
    run = run_experiment(tiny_config(tmp_path, "rounds=2", "privacy.noise_multiplier=0.01", "privacy.clip=1e-9",
                                     "privacy.delta=0.01"), progress=False)

    start = run_module.get_weights(build_initial_model(run.config, run.dataset))
    # two rounds move the weights by at most 2 (C + noise of std 0.01·C) per coordinate, within 1e-6 at C = 1e-9
    assert all(torch.allclose(run.weights[k], w, atol=1e-6, rtol=0) for k, w in start.items())
    assert all(row["server/delta_norm"] < 1e-6 for row in rows_of(run.run_dir))


def test_poisson_cohorts_can_be_empty_and_their_rounds_still_release_noise(tmp_path, tiny_config):
    run = run_experiment(tiny_config(tmp_path, "rounds=12", "evaluation.every=12", "algorithm.cohort_size=1",
                                     "privacy.sampling=poisson", "privacy.noise_multiplier=1.0", "privacy.clip=0.05",
                                     "privacy.delta=0.01"), progress=False)

    rows = rows_of(run.run_dir)
    sizes = [row["client/num_clients"] for row in rows]
    assert 0 in sizes and len(set(sizes)) > 1  # each of 9 clients joins with probability 1/9
    assert all(row["server/delta_norm"] > 0 for row in rows if row["client/num_clients"] == 0)


def test_a_target_epsilon_sets_the_noise_before_the_first_round(tmp_path, tiny_config):
    run = run_experiment(tiny_config(tmp_path, "privacy.target_epsilon=20", "privacy.clip=0.5", "privacy.delta=0.01",
                                     "privacy.sampling=poisson"), progress=False)

    rows = rows_of(run.run_dir)
    z = calibrate_noise_multiplier(20.0, rounds=3, cohort_size=3, population=9, delta=0.01, sampling="poisson")
    assert {row["privacy/noise_multiplier"] for row in rows} == {z}
    assert rows[-1]["privacy/epsilon"] <= 20.0


def test_the_shipped_dp_fedavg_config_is_the_synthetic_default_made_private():
    private = load_config("dp_fedavg")

    public = load_config("dp_fedavg", ["name=default", "privacy.target_epsilon=none", "privacy.delta=none",
                                       "privacy.clip=none", "privacy.sampling=fixed"])

    assert private.privacy.enabled and public == load_config()


@pytest.mark.slow
@pytest.mark.bits
def test_worker_processes_give_the_bits_of_the_in_process_engine(private_run, tmp_path, tiny_config):
    with_workers = run_experiment(tiny_config(tmp_path, *PRIVATE, "engine.workers=2"), progress=False)

    assert_same_checkpoint(read_checkpoint(with_workers.run_dir / "checkpoint.pt"),
                           read_checkpoint(private_run.run_dir / "checkpoint.pt"))
    assert without_times(rows_of(with_workers.run_dir)) == without_times(rows_of(private_run.run_dir))
