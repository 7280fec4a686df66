"""The methods beyond the paper from config to run: refusals, shipped configs, the same bits on every engine."""


import pytest
import torch

from fedmeta.cli import main
from fedmeta.experiment.config import load_config
from fedmeta.experiment.run import run_experiment
from run_cases import without_times

METHODS = {
    "fedprox": ["algorithm.name=fedprox", "algorithm.mu=0.5"],
    "fomaml": ["algorithm.name=fomaml", "algorithm.inner_steps=2", "algorithm.server_lr=0.5"],
    "maml": ["algorithm.name=maml", "algorithm.inner_steps=2", "algorithm.server_lr=0.5"],
    "perfedavg-fo": ["algorithm.name=perfedavg", "algorithm.local_steps=3", "algorithm.personalization_steps=2"],
    "perfedavg-hf": ["algorithm.name=perfedavg", "algorithm.local_steps=3", "algorithm.variant=hf"],
    "local_only": ["algorithm.name=local_only"],
}
# batches of 5, so that every client takes several steps
SMALL_BATCHES = "algorithm.client_batch_size=5"


@pytest.fixture(scope="module")
def in_process_run(tmp_path_factory, tiny_config):
    """Each method's tiny run on the in-process engine, run once per module."""
    runs = {}

    def run(method):
        if method not in runs:
            config = tiny_config(tmp_path_factory.mktemp(method), SMALL_BATCHES, *METHODS[method])
            runs[method] = run_experiment(config, progress=False)
        return runs[method]

    return run


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


ENGINES = {"process": ["engine.workers=2"], "ray": ["engine.kind=ray", "engine.workers=2"]}


# processes before Ray: a process engine must not fork a process that runs Ray
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("engine", ["process", pytest.param("ray", marks=pytest.mark.slow)])
@pytest.mark.bits
def test_every_engine_gives_the_bits_of_one_in_process_run(request, in_process_run, tiny_config, tmp_path, method,
                                                           engine):
    if engine == "ray":
        request.getfixturevalue("one_ray_engine")
    in_process = in_process_run(method)

    other = run_experiment(tiny_config(tmp_path, SMALL_BATCHES, *METHODS[method], *ENGINES[engine]), progress=False)

    assert without_times(other.history) == without_times(in_process.history)
    assert all(torch.equal(other.weights[k], in_process.weights[k]) for k in in_process.weights)
    assert other.report == in_process.report
