"""fedmeta eval: a run directory or its checkpoint, and only the settings an evaluation reads."""

import contextlib
import io
import re

import pytest

from fedmeta.cli import main
from fedmeta.experiment.config import load_config
from fedmeta.experiment.run import evaluation_keys


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_settings):
    """A finished two-round tiny run; tests only read it."""
    output_dir = tmp_path_factory.mktemp("eval")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["run", *tiny_settings(output_dir, "rounds=2"), "--no-progress"]) == 0
    return re.search(r"^run directory\s+(\S+)", out.getvalue(), re.MULTILINE).group(1)


def test_eval_of_a_run_directory_gives_the_numbers_of_its_checkpoint(run_dir, capsys):
    by_directory = run_cli(capsys, "eval", run_dir)
    by_file = run_cli(capsys, "eval", f"{run_dir}/checkpoint.pt")

    assert by_directory == by_file
    assert by_directory[0] == 0
    assert by_directory[1].startswith(f"checkpoint              {run_dir}/checkpoint.pt (held_out clients)\n")


def test_eval_of_a_runs_config_says_to_give_the_run_directory(run_dir, capsys):
    code, out, err = run_cli(capsys, "eval", f"{run_dir}/config.toml")

    assert (code, out) == (2, "")
    assert err == (f"fedmeta: error: {run_dir}/config.toml: a TOML file, not a checkpoint; give its run directory "
                   f"{run_dir} (or {run_dir}/checkpoint.pt)\n")


def test_eval_of_a_run_directory_without_a_checkpoint_says_so(tmp_path, capsys):
    (tmp_path / "config.toml").write_text('name = "stopped"\n')

    code, _, err = run_cli(capsys, "eval", str(tmp_path))

    assert code == 2
    assert err == (f"fedmeta: error: {tmp_path}: no checkpoint.pt in this run directory; the run stopped before its "
                   "first checkpoint\n")


def test_eval_refuses_a_training_setting_it_would_ignore(run_dir, capsys):
    code, out, err = run_cli(capsys, "eval", run_dir, "--set", "algorithm.client_lr=0.05")

    assert (code, out) == (2, "")
    assert err == ("fedmeta: error: --set algorithm.client_lr=0.05: eval does not use algorithm.client_lr; for a "
                   "fedavg checkpoint it takes evaluation.fine_tune_epochs, evaluation.fine_tune_optimizer, "
                   "evaluation.fine_tune_lr, evaluation.fine_tune_batch_size, evaluation.max_clients, data.path and "
                   "engine.*\n")


def test_eval_takes_the_fine_tuning_settings(run_dir, capsys):
    code, out, _ = run_cli(capsys, "eval", run_dir, "--set", "evaluation.fine_tune_epochs=4")

    assert code == 0
    assert len(re.search(r"by fine-tuning epoch((?: +\S+)+)", out).group(1).split()) == 4


def test_eval_of_maml_takes_its_adaptation_keys_not_the_fine_tuning_ones():
    config = load_config("maml")

    keys = evaluation_keys(config)

    assert keys[:5] == ("algorithm.inner_lr", "algorithm.inner_steps", "algorithm.client_batch_size",
                        "evaluation.max_clients", "data.path")
    assert "evaluation.fine_tune_lr" not in keys and "engine.workers" in keys


def test_eval_help_offers_an_evaluation_setting_as_its_example(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])

    out = capsys.readouterr().out
    assert "evaluation.fine_tune_lr=0.002" in out and "client_lr" not in out


def test_decompose_takes_a_run_directory(run_dir, capsys):
    by_directory = run_cli(capsys, "decompose", run_dir)
    by_file = run_cli(capsys, "decompose", f"{run_dir}/checkpoint.pt")

    assert by_directory == by_file and by_directory[0] == 0
