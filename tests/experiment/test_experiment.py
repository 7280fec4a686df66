"""fedmeta.Experiment: the CLI's run from Python, with one's own model, data, loss and metrics."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedmeta
from fedmeta.evaluation.tasks import Metric
from fedmeta.experiment.config import load_config
from fedmeta.experiment.run import run_experiment
from run_cases import regression_clients, without_times

TINY = ["data.num_clients=12", "data.held_out_fraction=0.25", "rounds=3", "algorithm.cohort_size=3",
        "evaluation.every=2", "evaluation.fine_tune_epochs=2", "engine.workers=0"]
REGRESSION = ["data.num_clients=10", "data.held_out_fraction=0.3", "algorithm.cohort_size=3", "rounds=4",
              "checkpoint_every=2", "evaluation.every=2", "engine.workers=0"]


def two_layers(input_dim):
    return nn.Sequential(nn.Linear(input_dim, 8), nn.Tanh(), nn.Linear(8, 1))


def largest_error(outputs, targets):
    """A metric of one's own: the batch's largest absolute error, reported as its mean over batches."""
    return (outputs.reshape(targets.shape) - targets).abs().max()


@pytest.mark.bits
def test_the_default_task_from_python_is_the_clis_run_bit_for_bit(tmp_path):
    ours = fedmeta.Experiment(overrides=[*TINY, f"output_dir={tmp_path}"]).run(progress=False)

    theirs = run_experiment(load_config(None, [*TINY, f"output_dir={tmp_path}"]), progress=False)

    assert without_times(ours.history) == without_times(theirs.history)
    assert all(torch.equal(ours.weights[k], theirs.weights[k]) for k in ours.weights)
    assert (ours.run_dir / "config.toml").read_text() == (theirs.run_dir / "config.toml").read_text()


@pytest.fixture(scope="module")
def regression(tmp_path_factory):
    """A regression of one's own model on one's own sites, scored by MAE, MSE and a metric of one's own."""
    experiment = fedmeta.Experiment(
        {"task": {"loss": "mse"}}, model=two_layers, dataset=regression_clients(),
        metrics=["mae", "mse", Metric("largest_error", largest_error, higher_is_better=False)],
        overrides=[*REGRESSION, f"output_dir={tmp_path_factory.mktemp('regression')}"])
    return experiment, experiment.run(progress=False)


def test_a_regression_from_python_leaves_the_whole_run_directory(regression):
    experiment, result = regression

    files = sorted(p.name for p in result.run_dir.iterdir())
    rows = result.history
    evaluation = json.loads((result.run_dir / "evaluation.json").read_text())
    assert files == ["checkpoint.pt", "config.toml", "evaluation.json", "evaluations.jsonl", "metrics.jsonl",
                     "provenance.json"]
    assert load_config(result.run_dir / "config.toml") == experiment.config == result.config
    assert experiment.config.model.name == f"{__name__}:two_layers"  # a factory with an import path
    assert experiment.config.task.metrics == ("mae", "mse", "<passed from Python: Metric 'largest_error'>")
    assert [r["round"] for r in rows if "initial/mae" in r] == [2, 4]
    assert {"initial/largest_error", "personalized/largest_error_by_epoch",
            "personalized/largest_error_share_hurt"} <= set(rows[-1])
    assert evaluation["primary_metric"] == "mae"
    assert rows[-1]["personalized/mae"] < rows[-1]["initial/mae"]  # each site's own slope is learnt


def test_a_regression_from_python_is_evaluated_and_plotted_again(regression):
    experiment, result = regression

    report = fedmeta.Experiment.evaluate(result.run_dir, dataset=regression_clients(), metrics=experiment.given.metrics)
    plots = fedmeta.Experiment.plot(result.run_dir)

    assert report.metrics() == {k: v for k, v in result.history[-1].items()
                                if k.startswith(("initial/", "personalized/", "evaluation/"))}
    assert [p.name for p in plots] == ["accuracy_over_rounds.png", "initial_vs_personalized.png",
                                       "client_distribution.png", "gain_by_client_size.png"]
    assert all(p.stat().st_size > 0 for p in plots)


def test_evaluating_without_the_parts_passed_from_python_says_which_to_pass(regression):
    _, result = regression

    with pytest.raises(ValueError, match=r"^data.kind = '<passed from Python: dict>', task.metrics = \[\"<passed "
                                         r"from Python: Metric 'largest_error'>\"\]: this run's dataset and metrics "
                                         r"were passed from Python, which config.toml cannot hold; pass them again: "
                                         r"fedmeta.Experiment.resume\(RUN_DIR, dataset=..., metrics=...\)"):
        fedmeta.Experiment.evaluate(result.run_dir)


@pytest.mark.bits
def test_a_loss_function_of_ones_own_trains_as_its_import_path_does(tmp_path):
    by_function = fedmeta.Experiment(overrides=[*REGRESSION, f"output_dir={tmp_path}"], model=two_layers,
                                     dataset=regression_clients(), loss=F.huber_loss,
                                     metrics=["mae"]).run(progress=False)

    by_path = fedmeta.Experiment(overrides=[*REGRESSION, f"output_dir={tmp_path}", f"model.name={__name__}:two_layers",
                                            "task.loss=torch.nn.functional:huber_loss", "task.metrics=['mae']"],
                                 dataset=regression_clients()).run(progress=False)

    assert by_function.config.task.loss == "torch.nn.functional:huber_loss"
    assert by_function.config == by_path.config
    assert all(torch.equal(by_function.weights[k], by_path.weights[k]) for k in by_function.weights)
