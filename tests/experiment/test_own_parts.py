"""Runs of one's own model, data and loss: named by import path in the config, or passed from Python."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fedmeta.cli import main
from fedmeta.data.federated import Examples
from fedmeta.data.partition import split_client_examples
from fedmeta.evaluation.tasks import METRICS, Task, squared_error
from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.config import load_config
from fedmeta.experiment.inputs import Given, RunInputs
from fedmeta.experiment.run import DivergenceError, resume_experiment, run_experiment
from run_cases import regression_clients

# a regression of one's own: each site's targets are its inputs times its own slope
OWN_MODULE = textwrap.dedent('''
    import torch
    from torch import nn


    def make_model(input_dim):
        return nn.Sequential(nn.Linear(input_dim, 8), nn.Tanh(), nn.Linear(8, 1))


    def load(seed, num_clients):
        generator = torch.Generator().manual_seed(seed)
        sites = {}
        for k in range(num_clients):
            x = torch.randn(12, 3, generator=generator)
            sites[f"site{k:02d}"] = (x, x @ (torch.tensor([1.0, -2.0, 0.5]) + 0.3 * k))
        return sites


    def not_a_model(input_dim):
        return "a string"
''')
REGRESSION = ("data.kind=own_parts:load", "model.name=own_parts:make_model", "task.loss=mse", "data.num_clients=10",
              "data.held_out_fraction=0.3", "algorithm.cohort_size=3", "algorithm.client_lr=0.05", "rounds=4",
              "checkpoint_every=2", "evaluation.every=2", "evaluation.fine_tune_epochs=2", "engine.workers=0")


def settings(output_dir, *overrides):
    return [a for o in (*REGRESSION, f"output_dir={output_dir}", *overrides) for a in ("--set", o)]


def the_run_dir(output_dir):
    (run_dir,) = output_dir.iterdir()
    return run_dir


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    """``own_parts.py`` in a directory on sys.path here and on PYTHONPATH for subprocesses."""
    folder = tmp_path / "site-packages"
    folder.mkdir()
    (folder / "own_parts.py").write_text(OWN_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "own_parts", raising=False)
    return folder


def fedmeta(own_module, *args):
    env = {**os.environ, "PYTHONPATH": str(own_module), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fedmeta", *args], env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
@pytest.mark.bits
def test_a_regression_by_import_path_runs_evaluates_and_resumes_through_the_cli(tmp_path, own_module, monkeypatch,
                                                                                crash_at_round):
    whole = fedmeta(own_module, "run", "--no-progress", *settings(tmp_path / "whole"))
    run_dir = the_run_dir(tmp_path / "whole")
    evaluated = fedmeta(own_module, "eval", str(run_dir))
    crash_at_round(2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(load_config(None, [*REGRESSION, f"output_dir={tmp_path / 'crashed'}"]), progress=False)
    resumed = fedmeta(own_module, "run", "--resume", str(the_run_dir(tmp_path / "crashed")), "--no-progress")

    assert (whole.returncode, evaluated.returncode, resumed.returncode) == (0, 0, 0), whole.stderr + resumed.stderr
    config = load_config(run_dir / "config.toml")
    assert (config.model.name, config.data.kind, config.task.loss) == ("own_parts:make_model", "own_parts:load", "mse")
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert (evaluation["primary_metric"], evaluation["higher_is_better"]) == ("mse", False)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["initial/mse"] == pytest.approx(last["initial/loss"])  # the loss is the primary metric
    assert f"initial mse             {last['initial/mse']:.4f}" in whole.stdout
    assert f"personalized mse        {last['personalized/mse']:.4f}" in evaluated.stdout  # eval repeats the run's
    assert last["personalized/mae"] < last["initial/mae"]  # personalizing to a site's own slope helps
    ended, resumed_end = read_checkpoint(run_dir / "checkpoint.pt"), read_checkpoint(
        the_run_dir(tmp_path / "crashed") / "checkpoint.pt")
    assert all(torch.equal(ended.state.weights[k], resumed_end.state.weights[k]) for k in ended.state.weights)


@pytest.mark.parametrize("override, message", [
    ("model.name=no_such_pkg.models:net", "model.name = 'no_such_pkg.models:net': cannot import 'no_such_pkg.models' "
                                          "(ModuleNotFoundError: No module named 'no_such_pkg')"),
    ("model.name=own_parts:make_net", "model.name = 'own_parts:make_net': module 'own_parts' has no 'make_net'"),
    ("model.name=own_parts:not_a_model", "model.name = 'own_parts:not_a_model': the factory returned str, not a "
                                         "torch.nn.Module"),
    ("data.kind=own_parts:lode", "data.kind = 'own_parts:lode': module 'own_parts' has no 'lode'"),
    ("task.loss=own_parts:huber", "task.loss = 'own_parts:huber': module 'own_parts' has no 'huber'"),
])
def test_a_bad_import_path_is_one_line_with_exit_status_2_before_any_run_directory(tmp_path, own_module, capsys,
                                                                                  override, message):
    code = main(["run", "--no-progress", *settings(tmp_path / "runs", override)])

    out, err = capsys.readouterr()
    assert (code, out, err) == (2, "", f"fedmeta: error: {message}\n")
    assert not (tmp_path / "runs").exists()


class LocalModel(nn.Module):
    """A model class of this test module: its instances have no import path, so they are passed again."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, x):
        return self.linear(x)


def local_model(num_classes):
    return nn.Linear(3, num_classes)


IN_MEMORY = ("task.loss=mse", "task.metrics=['mae']", "data.num_clients=10", "data.held_out_fraction=0.3",
             "algorithm.cohort_size=3", "rounds=4", "checkpoint_every=2", "evaluation.every=1",
             "evaluation.thresholds=[0.9]", "engine.workers=0")


@pytest.mark.bits
def test_parts_passed_from_python_are_named_in_the_config_and_must_be_passed_again_to_resume(tmp_path, monkeypatch,
                                                                                          capsys, crash_at_round):
    given = Given(model=LocalModel(), dataset=regression_clients())
    config = load_config(None, [*IN_MEMORY, f"output_dir={tmp_path / 'whole'}"])
    whole = run_experiment(config, given=given, progress=False)
    crash_at_round(2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(load_config(None, [*IN_MEMORY, f"output_dir={tmp_path / 'crashed'}"]), given=given,
                       progress=False)
    monkeypatch.undo()
    crashed = the_run_dir(tmp_path / "crashed")
    code = main(["run", "--resume", str(crashed), "--no-progress"])
    cli_error = capsys.readouterr().err
    with pytest.raises(ValueError) as python_error:
        resume_experiment(crashed, given=Given(model=LocalModel()), progress=False)
    resumed = resume_experiment(crashed, given=given, progress=False)

    recorded = load_config(whole.run_dir / "config.toml")
    assert (recorded.model.name, recorded.data.kind) == ("<passed from Python: LocalModel>",
                                                         "<passed from Python: dict>")
    assert code == 2
    assert cli_error == ("fedmeta: error: data.kind = '<passed from Python: dict>', model.name = '<passed from "
                         "Python: LocalModel>': this run's dataset and model were passed from Python, which "
                         "config.toml cannot hold; pass them again: fedmeta.Experiment.resume(RUN_DIR, dataset=..., "
                         "model=...) or fedmeta.Experiment.evaluate(RUN_DIR, dataset=..., model=...)\n")
    assert str(python_error.value) == ("data.kind = '<passed from Python: dict>': this run's dataset was passed from "
                                       "Python, which config.toml cannot hold; pass it again: "
                                       "fedmeta.Experiment.resume(RUN_DIR, dataset=...) or "
                                       "fedmeta.Experiment.evaluate(RUN_DIR, dataset=...)")
    assert all(torch.equal(whole.weights[k], resumed.weights[k]) for k in whole.weights)
    assert [r["personalized/mae"] for r in whole.history] == [r["personalized/mae"] for r in resumed.history]
    reached = next((r["round"] for r in whole.history if r["personalized/mae"] <= 0.9), None)
    thresholds = json.loads((whole.run_dir / "evaluation.json").read_text())["rounds_to_threshold"]
    assert thresholds["personalized/mae"] == {"0.9": reached}  # an error reaches a threshold from above


def test_the_divergence_yardstick_of_a_regression_is_the_mean_square_of_the_training_targets():
    dataset = split_client_examples({"a": (torch.zeros(2, 1), torch.tensor([1.0, 3.0])),
                                     "b": (torch.zeros(2, 1), torch.tensor([2.0, 2.0])),
                                     "c": (torch.zeros(2, 1), torch.tensor([5.0, 5.0]))},
                                    test_fraction=0.5, held_out_fraction=0.34, seed=0)
    inputs = RunInputs(dataset, nn.Linear(1, 1), Task(squared_error, (METRICS["mse"],)))
    targets = torch.cat([c.train.y for c in dataset.train_clients()])

    value, described = inputs.divergence_yardstick()

    assert value == pytest.approx(float((targets ** 2).mean()))
    assert described == f"{value:.4g}, the loss of all-zero outputs on the training clients"


def test_a_regression_run_that_blows_up_stops_against_the_loss_of_all_zero_outputs(tmp_path):
    config = load_config(None, [*IN_MEMORY, "algorithm.client_lr=5", f"output_dir={tmp_path}"])

    with pytest.raises(DivergenceError, match=r"^diverged at round \d: client/train_loss = \S+ is (not finite|more "
                                              r"than divergence_factor = 10 times \S+, the loss of all-zero outputs "
                                              r"on the training clients)"):
        run_experiment(config, given=Given(model=LocalModel(), dataset=regression_clients()), progress=False)


def test_a_dataset_the_loss_cannot_score_is_refused_before_the_run_directory(tmp_path):
    config = load_config(None, [*IN_MEMORY, "task.loss=cross_entropy", "task.metrics=['accuracy']",
                                f"output_dir={tmp_path / 'runs'}"])

    with pytest.raises(ValueError, match=r"^model.name = '<passed from Python: LocalModel>' does not fit data.kind = "
                                         r"'<passed from Python: dict>': on two examples of client 'site\d\d' it "
                                         r"raises RuntimeError: .*Float"):
        run_experiment(config, given=Given(model=LocalModel(), dataset=regression_clients()), progress=False)
    assert not (tmp_path / "runs").exists()


def test_examples_are_a_dataset_of_pairs_split_by_dirichlet_label_skew(tmp_path):
    x = torch.randn(200, 3, generator=torch.Generator().manual_seed(0))
    data = Examples(x, (x[:, 0] > 0).long())
    config = load_config(None, ["data.num_clients=8", "data.alpha=0.3", "algorithm.cohort_size=2", "rounds=1",
                                "engine.workers=0", f"output_dir={tmp_path}"])

    result = run_experiment(config, given=Given(model=local_model, dataset=data), progress=False)

    assert result.dataset.name == "dirichlet(0.3)"
    assert len(result.dataset.clients) == 8
    assert load_config(result.run_dir / "config.toml").model.name == f"{__name__}:local_model"


def test_a_loss_that_cannot_reach_worker_processes_is_one_line_before_the_run_directory(tmp_path):
    config = load_config(None, [*IN_MEMORY, "engine.workers=2", f"output_dir={tmp_path / 'runs'}"])

    with pytest.raises(ValueError, match=r"^the task's loss or metrics cannot be sent to the engine's worker processes "
                                         r"\(.*lambda.*\); define them at a module's top level, or set "
                                         r"engine.workers = 0$"):
        run_experiment(config, given=Given(model=LocalModel(), dataset=regression_clients(),
                                           loss=lambda outputs, targets: (outputs - targets).abs().mean()),
                       progress=False)
    assert not (tmp_path / "runs").exists()
