"""``engine.client_states = "disk"``: a stateful run with its client states in files gives the bits of one with them
in memory, its checkpoints name the files rather than hold them, and it resumes exactly after a crash or SIGKILL."""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fedmeta.cli import main
from fedmeta.engine.states import DiskStates
from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.config import load_config
from fedmeta.experiment.run import resume_experiment, run_experiment
from run_cases import assert_same_run, metrics_lines_after_first_checkpoint, same_states, without_times

# Ditto over 4 rounds, a checkpoint every 2: clients come back to their personal models
DITTO = ("rounds=4", "algorithm.client_batch_size=5", "checkpoint_every=2", "algorithm.name=ditto",
         "algorithm.lam=0.5")
ON_DISK = "engine.client_states=disk"


def files_in(run_dir):
    return sorted(p.name for p in (run_dir / "client_states").iterdir())


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory, tiny_config):
    """Ditto's tiny run with its client states in memory, in this process; tests only read it."""
    return run_experiment(tiny_config(tmp_path_factory.mktemp("memory"), *DITTO), progress=False)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.bits
def test_states_on_disk_give_the_bits_of_states_in_memory_and_the_checkpoint_names_them(tmp_path, tiny_config,
                                                                                        in_memory, workers):
    result = run_experiment(tiny_config(tmp_path, *DITTO, ON_DISK, f"engine.workers={workers}"), progress=False)

    checkpoint = read_checkpoint(result.run_dir / "checkpoint.pt")
    named = torch.load(result.run_dir / "checkpoint.pt", weights_only=True)["client_state_files"]

    assert_same_run(result, in_memory)
    assert isinstance(result.client_states, DiskStates) and len(result.client_states) > 3
    assert same_states(checkpoint.client_states, read_checkpoint(in_memory.run_dir / "checkpoint.pt").client_states)
    assert files_in(result.run_dir) == sorted(named.values())  # superseded states removed after the checkpoint
    assert not (in_memory.run_dir / "client_states").exists()


@pytest.fixture
def crashed(tmp_path, monkeypatch, tiny_config, crash_at_round):
    """A run on disk that crashed before its 4th round, its 3rd round's states written after its checkpoint."""
    crash_at_round(3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path / "runs", *DITTO, ON_DISK), progress=False)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


@pytest.mark.bits
def test_a_run_on_disk_resumed_after_a_crash_ends_as_one_never_stopped_in_memory(crashed, in_memory):
    named = set(torch.load(crashed / "checkpoint.pt", weights_only=True)["client_state_files"].values())
    written_after = set(files_in(crashed)) - named

    resumed = resume_experiment(crashed, progress=False)

    assert written_after  # the crashed run had gone on writing past its checkpoint
    assert_same_run(resumed, in_memory)
    assert files_in(crashed) == sorted(read_checkpoint(crashed / "checkpoint.pt").client_states.files().values())


@pytest.mark.parametrize("damage", ["missing", "another client's", "truncated"])
def test_a_checkpoint_naming_a_missing_or_wrong_state_file_is_refused_in_one_line(crashed, capsys, damage):
    named = torch.load(crashed / "checkpoint.pt", weights_only=True)["client_state_files"]
    (client, name), (other, other_name) = list(named.items())[:2]
    path = crashed / "client_states" / name
    if damage == "missing":
        path.unlink()
    elif damage == "another client's":
        shutil.copyfile(crashed / "client_states" / other_name, path)
    else:
        path.write_bytes(path.read_bytes()[:100])
    version = name.split(".")[-2]

    code = main(["run", "--resume", str(crashed), "--no-progress"])

    why = {"missing": "missing: state {v} of client {c!r}",
           "another client's": "not state {v} of client {c!r}: it holds state {ov} of client {o!r}",
           "truncated": "not state {v} of client {c!r}: the file is truncated or corrupted (RuntimeError)"}[damage]
    assert code == 2
    assert capsys.readouterr().err == (
        f"fedmeta: error: {crashed / 'checkpoint.pt'}: names a client state file it cannot use: {path}: "
        + why.format(v=version, c=client, ov=other_name.split(".")[-2], o=other) + "\n")


def test_a_full_disk_while_writing_a_state_stops_the_run_in_one_line_and_it_resumes_once_freed(
        tmp_path, monkeypatch, capsys, tiny_settings, in_memory):
    real_save = torch.save
    output = tmp_path / "runs"

    def full_after_the_first_checkpoint(obj, file, *args, **kwargs):
        if Path(file.name).parent.name == "client_states" and any(output.glob("*/checkpoint.pt")):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_after_the_first_checkpoint)
    code = main(["run", "--no-progress", *tiny_settings(output, *DITTO, ON_DISK)])
    monkeypatch.undo()
    (run_dir,) = output.iterdir()
    err = capsys.readouterr().err

    resumed = resume_experiment(run_dir, progress=False)

    assert code == 2
    assert re.fullmatch(
        f"fedmeta: error: {re.escape(str(run_dir / 'client_states'))}/[^/]+\\.[0-9]+\\.pt: cannot write the state of "
        f"client '[^']+' \\(No space left on device\\); stopped, {re.escape(str(run_dir / 'checkpoint.pt'))} keeps "
        f"the run after 2 rounds: free space or fix the directory, then continue with `fedmeta run --resume "
        f"{re.escape(str(run_dir))}`\n", err), err
    assert not list((run_dir / "client_states").glob("*.partial"))
    assert_same_run(resumed, in_memory)


# Long enough (tens of ms a round) to be killed mid-run, with clients that come back to their state
KILLED = ["data.num_clients=24", "data.held_out_fraction=0.25", "rounds=20", "algorithm.cohort_size=4",
          "algorithm.local_epochs=2", "evaluation.every=5", "evaluation.fine_tune_epochs=1",
          "evaluation.max_clients=3", "checkpoint_every=3", "engine.workers=2"]


def fedmeta_run(output_dir, *overrides):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    settings = [item for override in (*KILLED, *overrides, f"output_dir={output_dir}") for item in ("--set", override)]
    return subprocess.Popen([sys.executable, "-m", "fedmeta", "run", "ditto", "--no-progress", *settings], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.bits
def test_a_run_on_disk_killed_mid_run_and_resumed_ends_with_the_bits_of_one_in_memory(tmp_path):
    run_experiment(load_config("ditto", [*KILLED, f"output_dir={tmp_path / 'memory'}"]), progress=False)
    process = fedmeta_run(tmp_path / "disk", ON_DISK)
    while metrics_lines_after_first_checkpoint(tmp_path / "disk") < 10 and process.poll() is None:
        time.sleep(0.002)
    still_running = process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)  # the run and its workers, as a machine crash would
    process.wait(timeout=30)
    (run_dir,), (expected_dir,) = (tmp_path / "disk").iterdir(), (tmp_path / "memory").iterdir()

    resumed = subprocess.run([sys.executable, "-m", "fedmeta", "run", "--resume", str(run_dir), "--no-progress"],
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, timeout=300)

    assert still_running, "the run ended before it could be killed"
    assert resumed.returncode == 0, resumed.stderr.decode()
    checkpoint, expected = read_checkpoint(run_dir / "checkpoint.pt"), read_checkpoint(expected_dir / "checkpoint.pt")
    assert all(torch.equal(checkpoint.state.weights[k], expected.state.weights[k]) for k in expected.state.weights)
    assert len(expected.client_states) > 4 and same_states(checkpoint.client_states, expected.client_states)
    assert files_in(run_dir) == sorted(checkpoint.client_states.files().values())
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            for d in (run_dir, expected_dir)]
    assert without_times(rows[0]) == without_times(rows[1])
    evaluations = [json.loads((d / "evaluation.json").read_text()) for d in (run_dir, expected_dir)]
    assert evaluations[0] == evaluations[1]
