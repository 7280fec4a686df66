"""Methods whose clients keep state (Ditto, FedRep, FedPer, SCAFFOLD), and pFedMe, from config to run: refusals,
shipped configs, the same bits on every engine, client states in checkpoints and a bit-identical resume after
SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fedmeta.cli import main
from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.config import load_config
from fedmeta.experiment.run import resume_experiment, run_experiment
from run_cases import assert_same_run, metrics_lines_after_first_checkpoint, same_states, without_times

METHODS = {
    "ditto": ["algorithm.name=ditto", "algorithm.lam=0.5"],
    "pfedme": ["algorithm.name=pfedme", "algorithm.lam=5", "algorithm.local_steps=3", "algorithm.inner_steps=2",
               "algorithm.server_lr=0.5"],
    "scaffold": ["algorithm.name=scaffold", "algorithm.local_epochs=2", "algorithm.server_lr=0.5"],
    "fedrep": ["algorithm.name=fedrep", "model.name=mlp", "model.personal=['fc2']", "algorithm.head_epochs=2"],
    "fedper": ["algorithm.name=fedper", "model.name=mlp", "model.personal=['fc2']"],
}  # the two with the MLP last, so that runs on one Ray engine share it
# the shared tiny experiment over 4 rounds: some clients return with state, some start fresh
STATEFUL = ("rounds=4", "algorithm.client_batch_size=5", "checkpoint_every=2")


@pytest.mark.parametrize(("overrides", "message"), [
    (["algorithm.name=ditto", "algorithm.lam=-0.5"],
     "algorithm.lam = -0.5: expected a regularization weight >= 0, finite"),
    (["algorithm.name=fedrep", "model.name=mlp", "model.personal=['fc3']"],
     "model.personal = ['fc3']: model 'mlp' has no module 'fc3' with weights (its modules with weights: fc1, fc2)"),
    (["algorithm.name=fedrep", "model.name=mlp", "model.personal=['fc1', 'fc2']"],
     "model.personal = ['fc1', 'fc2']: every weight of model 'mlp' is personal, so clients would share nothing; "
     "name the head only"),
    (["algorithm.name=fedper"],
     "model.personal = []: expected the names of the model's personal modules (its head, e.g. ['fc2'] of the "
     "'mlp') for algorithm.name = 'fedper'"),
    (["algorithm.name=fedavg", "model.personal=['linear']"],
     "model.personal = ['linear']: expected unset: only fedrep and fedper keep personal modules, not "
     "algorithm.name = 'fedavg'"),
    (["algorithm.name=pfedme", "algorithm.lam=0"],
     "algorithm.lam = 0.0: expected a regularization weight > 0 for pfedme (with 0 its local model never moves)"),
    (["algorithm.name=pfedme", "algorithm.inner_steps=0"], "algorithm.inner_steps = 0: expected at least 1"),
    (["algorithm.name=fedrep", "model.name=mlp", "model.personal=['fc2']", "algorithm.head_epochs=0"],
     "algorithm.head_epochs = 0: expected at least 1"),
    (["algorithm.name=scaffold", "algorithm.client_optimizer=adam"],
     "algorithm.client_optimizer = 'adam': expected 'sgd' for scaffold (its control variates assume SGD client steps)"),
    (["algorithm.name=scaffold", "algorithm.server_lr=0"],
     "algorithm.server_lr = 0.0: expected a positive, finite learning rate"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_directory(tmp_path, capsys, overrides, message):
    code = main(["run", "--no-progress", *[a for o in overrides for a in ("--set", o)],
                 "--set", f"output_dir={tmp_path / 'runs'}"])

    err = capsys.readouterr().err
    assert code == 2
    assert err == f"fedmeta: error: {message}\n"
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["ditto", "fedrep", "fedper", "pfedme", "scaffold"])
def test_each_stateful_method_ships_a_config_by_its_name(name):
    config = load_config(name)

    assert (config.name, config.algorithm.name, config.data.kind) == (name, name, "synthetic")


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, tiny_config):
    """Each method's tiny run on the in-process engine; tests only read them."""
    return {method: run_experiment(tiny_config(tmp_path_factory.mktemp(method), *STATEFUL, *overrides),
                                   progress=False)
            for method, overrides in METHODS.items()}


def test_clients_keep_their_state_and_checkpoints_hold_it(in_process):
    ditto = in_process["ditto"]
    sampled = {c.client_id for round_idx in range(4) for c in ditto.dataset.sample_cohort(3, 0, round_idx)}

    checkpoint = read_checkpoint(ditto.run_dir / "checkpoint.pt")

    assert set(ditto.client_states) == sampled
    assert same_states(checkpoint.client_states, ditto.client_states)
    assert list(in_process["fedrep"].client_states.values())[0].keys() == {"fc2.weight", "fc2.bias"}


def test_scaffolds_checkpoint_holds_c_the_mean_of_every_training_clients_ci(in_process):
    scaffold = in_process["scaffold"]
    states = scaffold.client_states

    control = read_checkpoint(scaffold.run_dir / "checkpoint.pt").state.server["control"]

    assert control.keys() == scaffold.weights.keys() and len(states) < len(scaffold.dataset.train_ids)
    for key, c in control.items():  # clients never sampled keep c_i = 0
        torch.testing.assert_close(c, sum(s[key] for s in states.values()) / len(scaffold.dataset.train_ids))


# every process run before Ray starts: a process engine must not fork a process that runs Ray
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("engine", ["process", pytest.param("ray", marks=pytest.mark.slow)])
@pytest.mark.bits
def test_every_engine_gives_the_bits_of_one_in_process_run(request, tmp_path, tiny_config, in_process, engine, method):
    if engine == "ray":
        request.getfixturevalue("one_ray_engine")

    result = run_experiment(tiny_config(tmp_path, *STATEFUL, *METHODS[method], f"engine.kind={engine}",
                                        "engine.workers=2"), progress=False)

    assert_same_run(result, in_process[method])


@pytest.mark.parametrize("method", ["fedrep", "scaffold"])
@pytest.mark.bits
def test_a_run_resumed_from_its_checkpoint_ends_with_the_same_bits_and_states(tmp_path, monkeypatch, tiny_config,
                                                                              in_process, method,
                                                                              crash_at_round):
    crash_at_round(3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path, *STATEFUL, *METHODS[method]), progress=False)
    monkeypatch.undo()
    (run_dir,) = tmp_path.iterdir()

    resumed = resume_experiment(run_dir, progress=False)

    assert_same_run(resumed, in_process[method])


def test_a_checkpoint_whose_client_states_do_not_fit_the_method_is_refused(tmp_path, capsys, in_process):
    path = in_process["fedrep"].run_dir / "checkpoint.pt"
    payload = torch.load(path, weights_only=True)
    client = next(iter(payload["client_states"]))
    payload["client_states"][client]["fc2.weight"] = torch.zeros(3)
    torch.save(payload, tmp_path / "checkpoint.pt")

    code = main(["eval", str(tmp_path / "checkpoint.pt")])

    assert code == 2
    assert capsys.readouterr().err == (
        f"fedmeta: error: {tmp_path / 'checkpoint.pt'}: does not fit its config (client_states[{client!r}]"
        "['fc2.weight'] is a torch.float32 tensor of shape (3,), expected torch.float32 of shape (10, 32))\n")


# Long enough (tens of ms a round) to be killed mid-run, with clients that come back to their state
KILLED = ["data.num_clients=24", "data.held_out_fraction=0.25", "rounds=20", "algorithm.cohort_size=4",
          "algorithm.local_epochs=2", "evaluation.every=5", "evaluation.fine_tune_epochs=1",
          "evaluation.max_clients=3", "checkpoint_every=3"]


def fedmeta_command(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedmeta", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def settings(*overrides):
    return [item for override in overrides for item in ("--set", override)]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "workers"), [("ditto", 2), ("scaffold", 0)])  # client and server state
@pytest.mark.bits
def test_a_stateful_run_killed_mid_run_and_resumed_ends_with_the_same_bits_and_states(tmp_path, method, workers):
    # the run to match, in this process on the in-process engine: every engine and worker count gives its bits
    assert main(["run", method, "--no-progress",
                 *settings(*KILLED, "engine.workers=0", f"output_dir={tmp_path / 'a'}")]) == 0
    process = fedmeta_command("run", method, "--no-progress",
                              *settings(*KILLED, f"engine.workers={workers}", f"output_dir={tmp_path / 'b'}"))
    while metrics_lines_after_first_checkpoint(tmp_path / "b") < 10 and process.poll() is None:
        time.sleep(0.002)
    still_running = process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)  # the run and its workers, as a machine crash would
    process.wait(timeout=30)
    (run_dir,), (expected_dir,) = (tmp_path / "b").iterdir(), (tmp_path / "a").iterdir()

    resumed = fedmeta_command("run", "--resume", str(run_dir), "--no-progress")
    _, stderr = resumed.communicate(timeout=300)

    assert still_running, "the run ended before it could be killed"
    assert resumed.returncode == 0, stderr.decode()
    checkpoint, expected = read_checkpoint(run_dir / "checkpoint.pt"), read_checkpoint(expected_dir / "checkpoint.pt")
    assert all(torch.equal(checkpoint.state.weights[k], expected.state.weights[k]) for k in expected.state.weights)
    assert len(expected.client_states) > 4 and same_states(checkpoint.client_states, expected.client_states)
    assert same_states(checkpoint.state.server, expected.state.server)  # SCAFFOLD's c; {} for Ditto's plain SGD
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (run_dir, expected_dir)]
    assert without_times(rows[0]) == without_times(rows[1])
    evaluations = [json.loads((d / "evaluation.json").read_text()) for d in (run_dir, expected_dir)]
    assert evaluations[0] == evaluations[1]
