import json

import numpy as np
import pytest
import torch

from fedmeta.experiment.config import load_config
from fedmeta.experiment.checkpoint import load_checkpoint
from fedmeta.experiment.run import evaluate_checkpoint, run_experiment
from run_cases import without_times


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config):
    """The tiny config run from start to end; tests only read it and its run directory."""
    return run_experiment(tiny_config(tmp_path_factory.mktemp("finished")), progress=False)


def test_run_directory_holds_config_metrics_evaluation_and_checkpoint(finished):
    result = finished

    files = sorted(p.name for p in result.run_dir.iterdir())
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((result.run_dir / "evaluation.json").read_text())
    assert files == ["checkpoint.pt", "config.toml", "evaluation.json", "evaluations.jsonl", "metrics.jsonl",
                     "provenance.json"]
    assert load_config(result.run_dir / "config.toml") == result.config
    assert [row["round"] for row in rows] == [1, 2, 3]  # rounds done
    assert ["initial/accuracy" in row for row in rows] == [False, True, True]  # every 2nd round and the last
    assert rows == json.loads(json.dumps(result.history))
    assert evaluation["client_ids"] == list(result.dataset.held_out_ids)
    assert len(evaluation["personalized_accuracy"][0]) == 2
    # every evaluation's per-client numbers, one line each: their means are the metrics rows', the last is
    # evaluation.json's
    evaluations = [json.loads(line) for line in (result.run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert [e["round"] for e in evaluations] == [2, 3]
    for e, row in zip(evaluations, rows[1:]):
        assert np.mean(e["initial_accuracy"]) == pytest.approx(row["initial/accuracy"], abs=1e-12)
    assert evaluations[-1] == {key: value for key, value in evaluation.items() if key != "rounds_to_threshold"}


def test_checkpoint_loads_with_weights_only_and_holds_the_final_weights(finished):
    result = finished

    config, weights, rounds_done = load_checkpoint(result.run_dir / "checkpoint.pt")

    assert config == result.config
    assert rounds_done == 3
    assert weights.keys() == result.weights.keys()
    for key in weights:
        assert torch.equal(weights[key], result.weights[key])


@pytest.mark.bits
def test_same_config_and_seed_give_the_same_bits(tmp_path, tiny_config, finished):
    first = finished
    second = run_experiment(tiny_config(tmp_path), progress=False)

    assert without_times(first.history) == without_times(second.history)
    for key in first.weights:
        assert torch.equal(first.weights[key], second.weights[key])


def test_another_seed_gives_other_weights(tmp_path, tiny_config, finished):
    first = finished
    second = run_experiment(tiny_config(tmp_path, "seed=1"), progress=False)

    assert any(not torch.equal(first.weights[k], second.weights[k]) for k in first.weights)


def test_evaluating_the_checkpoint_reproduces_the_runs_last_evaluation(finished):
    result = finished

    _, report = evaluate_checkpoint(result.run_dir / "checkpoint.pt")

    last = result.history[-1]
    assert report.metrics() == {k: last[k] for k in report.metrics()}


def test_checkpoint_evaluation_takes_evaluation_overrides(finished):
    result = finished

    config, report = evaluate_checkpoint(result.run_dir / "checkpoint.pt",
                                         ["evaluation.fine_tune_epochs=4", "evaluation.max_clients=2"])

    assert config.evaluation.fine_tune_epochs == 4
    assert report.personalized_accuracy.shape == (4, 2)


def test_centralized_baseline_trains_on_the_pooled_training_clients(tmp_path, tiny_config):
    result = run_experiment(tiny_config(tmp_path, "algorithm.name=centralized", "algorithm.local_steps=4"),
                            progress=False)

    pooled = sum(c.num_train for c in result.dataset.train_clients())
    assert [row["client/num_clients"] for row in result.history] == [1, 1, 1]
    assert [row["client/num_examples"] for row in result.history] == [pooled] * 3


def test_two_stage_schedule_switches_stage_at_the_configured_round(tmp_path, tiny_config):
    config = tiny_config(tmp_path, "rounds=4", "algorithm.name=two_stage", "algorithm.switch_round=2",
                         "algorithm.server_momentum=0.9")

    result = run_experiment(config, progress=False)

    assert [row["stage"] for row in result.history] == [0, 0, 1, 1]


def test_rounds_to_threshold_are_written_for_each_accuracy(tmp_path, tiny_config):
    result = run_experiment(tiny_config(tmp_path, "evaluation.thresholds=[0.5, 1.0]"), progress=False)

    evaluation = json.loads((result.run_dir / "evaluation.json").read_text())

    reached = evaluation["rounds_to_threshold"]
    assert set(reached) == {"initial/accuracy", "personalized/accuracy"}
    assert reached["personalized/accuracy"] == {"0.5": 2, "1": None}  # the first evaluation ends round 2


def test_cohort_larger_than_the_training_clients_is_refused(tmp_path, tiny_config):
    # 10 of the 12 clients passes the config check; only 9 of them are training clients
    with pytest.raises(ValueError, match=r"algorithm.cohort_size = 10: the dataset has only 9 training clients"):
        run_experiment(tiny_config(tmp_path, "algorithm.cohort_size=10"), progress=False)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, path)

    with pytest.raises(ValueError, match=r"weights.pt: not a fedmeta checkpoint"):
        load_checkpoint(path)


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")


@pytest.mark.slow
def test_embedded_default_personalizes_what_the_global_model_cannot_fit(tmp_path):
    result = run_experiment(load_config(None, [f"output_dir={tmp_path}"]), progress=False)

    # Synthetic(0.5, 0.5) gives every client its own model: fine-tuning must recover it
    assert result.report.personalized[-1].mean > result.report.initial.mean + 0.5
    assert result.report.share_hurt < 0.1
