"""The methods beyond the paper from config to run: refusals, shipped configs, the same bits on every engine."""

import os

import pytest
import torch

from fedmeta.cli import main
from fedmeta.experiment.config import load_config
from fedmeta.experiment.run import run_experiment

METHODS = {
    "fedprox": ["algorithm.name=fedprox", "algorithm.mu=0.5"],
    "fomaml": ["algorithm.name=fomaml", "algorithm.inner_steps=2", "algorithm.server_lr=0.5"],
    "maml": ["algorithm.name=maml", "algorithm.inner_steps=2", "algorithm.server_lr=0.5"],
    "perfedavg-fo": ["algorithm.name=perfedavg", "algorithm.local_steps=3", "algorithm.personalization_steps=2"],
    "perfedavg-hf": ["algorithm.name=perfedavg", "algorithm.local_steps=3", "algorithm.variant=hf"],
    "local_only": ["algorithm.name=local_only"],
}
TINY = ["data.num_clients=12", "data.held_out_fraction=0.25", "rounds=3", "algorithm.cohort_size=3",
        "algorithm.client_batch_size=5", "evaluation.every=2", "evaluation.fine_tune_epochs=2"]


def without_times(history):
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in history]


def single_threaded(function, *args, **kwargs):
    """Runs on one thread, as an engine's worker does: kernels may reduce differently on more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("override", "message"), [
    ("algorithm.mu=-0.1", "algorithm.mu = -0.1: expected a proximal weight >= 0, finite"),
    ("algorithm.inner_steps=0", "algorithm.inner_steps = 0: expected at least 1"),
    ("algorithm.local_steps=0", "algorithm.local_steps = 0: expected at least 1"),
    ("algorithm.personalization_steps=0", "algorithm.personalization_steps = 0: expected at least 1"),
    ("algorithm.inner_lr=0", "algorithm.inner_lr = 0.0: expected a positive, finite learning rate"),
    ("algorithm.variant=so", "algorithm.variant = 'so': expected one of 'fo', 'hf'"),
])
def test_an_out_of_range_hyperparameter_is_one_line_exit_2_and_no_run_directory(tmp_path, capsys, override, message):
    code = main(["run", "--no-progress", "--set", "algorithm.name=perfedavg", "--set", override,
                 "--set", f"output_dir={tmp_path / 'runs'}"])

    err = capsys.readouterr().err
    assert code == 2
    assert err == f"fedmeta: error: {message}\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["fedprox", "fomaml", "maml", "perfedavg", "local_only"])
def test_each_method_ships_a_config_by_its_name(name):
    config = load_config(name)

    assert (config.name, config.algorithm.name, config.data.kind) == (name, name, "synthetic")


@pytest.mark.slow
@pytest.mark.parametrize(("name", "stages"), [("fedprox", 3), ("fomaml", 5), ("maml", 5), ("perfedavg", 1),
                                              ("local_only", 10)])
def test_each_shipped_config_trains_and_personalizes_by_its_own_rule(tmp_path, name, stages):
    config = load_config(name, ["rounds=2", "engine.workers=0", f"output_dir={tmp_path}"])

    result = run_experiment(config, progress=False)

    assert result.report.personalized_accuracy.shape == (stages, len(result.report.clients))
    assert result.report.personalized[-1].mean > result.report.initial.mean


@pytest.mark.parametrize("method", METHODS)
def test_worker_processes_give_the_bits_of_one_in_process_run(tmp_path, method):
    settings = [*TINY, *METHODS[method]]
    in_process = single_threaded(run_experiment, load_config(None, [*settings, "engine.workers=0",
                                                                    f"output_dir={tmp_path / 'a'}"]), progress=False)

    workers = run_experiment(load_config(None, [*settings, "engine.workers=2", f"output_dir={tmp_path / 'b'}"]),
                             progress=False)

    assert without_times(workers.history) == without_times(in_process.history)
    assert all(torch.equal(workers.weights[k], in_process.weights[k]) for k in in_process.weights)
    assert workers.report == in_process.report


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.mark.parametrize("method", METHODS)
def test_ray_actors_give_the_bits_of_one_in_process_run(local_ray, tmp_path, method):
    settings = [*TINY, *METHODS[method]]
    in_process = single_threaded(run_experiment, load_config(None, [*settings, "engine.workers=0",
                                                                    f"output_dir={tmp_path / 'a'}"]), progress=False)

    on_ray = run_experiment(load_config(None, [*settings, "engine.kind=ray", "engine.workers=2",
                                               f"output_dir={tmp_path / 'b'}"]), progress=False)

    assert without_times(on_ray.history) == without_times(in_process.history)
    assert all(torch.equal(on_ray.weights[k], in_process.weights[k]) for k in in_process.weights)
    assert on_ray.report == in_process.report
