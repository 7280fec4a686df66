"""The run directory: its names, its metrics file, and one writer at a time (real processes)."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from fedmeta.cli import main
from fedmeta.experiment.run_dir import (
    RunDirBusy, RunDirName, append_metrics, locked, new_run_dir, open_metrics, parse_run_dir_name, read_metrics,
)

# about 70 ms a round on 2 cores, so a second process starts while the first still runs
SLOW = [
    "data.num_clients=24", "data.held_out_fraction=0.25", "rounds=60", "algorithm.cohort_size=4",
    "algorithm.local_epochs=2", "evaluation.every=5", "evaluation.fine_tune_epochs=1", "evaluation.max_clients=3",
    "checkpoint_every=3", "engine.workers=0",
]


def settings(*overrides):
    return [item for override in overrides for item in ("--set", override)]


def fedmeta(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "fedmeta", *args], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def rounds_in(run_dir):
    return [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_directory_name_parses_back_into_its_parts():
    assert parse_run_dir_name("two-stage-c2-20261203-101500") == RunDirName("two-stage-c2", "20261203-101500", 1)
    assert parse_run_dir_name("a-20261203-101500-3") == RunDirName("a", "20261203-101500", 3)
    assert parse_run_dir_name("plots") is None


def test_runs_started_in_the_same_second_get_numbered_directories(tmp_path, monkeypatch):
    monkeypatch.setattr(time, "strftime", lambda _: "20261203-101500")

    first, second = new_run_dir(tmp_path, "a"), new_run_dir(tmp_path, "a")

    assert (first.name, second.name) == ("a-20261203-101500", "a-20261203-101500-2")
    assert parse_run_dir_name(second.name).order > parse_run_dir_name(first.name).order


def test_metrics_whose_rounds_repeat_are_refused_in_one_line(tmp_path):
    with open_metrics(tmp_path) as file:
        for rounds_done in (1, 2, 3, 2, 3):
            append_metrics(file, {"round": rounds_done})

    with pytest.raises(ValueError) as error:
        read_metrics(tmp_path)

    assert str(error.value) == (f"{tmp_path / 'metrics.jsonl'}: line 4 holds round 2 after round 3; rounds that "
                                "repeat or go backwards mean two processes wrote this run at once, so its metrics "
                                "cannot be trusted")


def test_fedmeta_plot_refuses_interleaved_metrics(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"round": 1}\n{"round": 2}\n{"round": 1}\n')

    code = main(["plot", str(tmp_path)])

    assert code == 2
    assert capsys.readouterr().err == (f"fedmeta: error: {tmp_path / 'metrics.jsonl'}: line 3 holds round 1 after "
                                       "round 2; rounds that repeat or go backwards mean two processes wrote this run "
                                       "at once, so its metrics cannot be trusted\n")


@pytest.fixture
def live_run(tmp_path):
    """A ``fedmeta run`` process past its first checkpoint, and its run directory."""
    process = fedmeta("run", "--no-progress", *settings(*SLOW, f"output_dir={tmp_path / 'runs'}"))
    run_dir = tmp_path / "runs" / re.fullmatch(r"run directory +\S+/(\S+)\n", process.stdout.readline())[1]
    wait_for(lambda: (run_dir / "checkpoint.pt").exists())
    yield process, run_dir
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.slow  # real processes
def test_resuming_a_run_that_is_still_running_is_refused_naming_its_pid(live_run):
    process, run_dir = live_run
    os.killpg(process.pid, signal.SIGSTOP)  # alive and holding the lock however long the second takes to start

    second = fedmeta("run", "--resume", str(run_dir), "--no-progress")
    out, err = second.communicate(timeout=120)
    os.killpg(process.pid, signal.SIGCONT)
    _, first_err = process.communicate(timeout=300)

    assert second.returncode == 2 and out == ""
    assert err == (f"fedmeta: error: {run_dir}: another fedmeta process (PID {process.pid}) is writing this run "
                   "directory; wait for it to end, or stop it, then try again\n")
    assert process.returncode == 0, first_err
    assert rounds_in(run_dir) == list(range(1, 61))
    assert not (run_dir / ".lock").exists()


@pytest.mark.slow
def test_two_resumes_at_once_leave_one_writer_and_whole_metrics(live_run):
    process, run_dir = live_run
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    resumes = [fedmeta("run", "--resume", str(run_dir), "--no-progress") for _ in range(2)]
    results = [(r.wait(timeout=300), *r.communicate()) for r in resumes]

    assert sorted(code for code, _, _ in results) == [0, 2]
    (refused_err,) = [err for code, _, err in results if code == 2]
    assert re.fullmatch(rf"fedmeta: error: {re.escape(str(run_dir))}: another fedmeta process \(PID \d+\) is "
                        r"writing this run directory; wait for it to end, or stop it, then try again\n", refused_err)
    assert rounds_in(run_dir) == list(range(1, 61))


@pytest.mark.slow
def test_a_run_killed_with_sigkill_leaves_no_stale_lock(live_run):
    process, run_dir = live_run

    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    left = (run_dir / ".lock").read_text()
    resumed = fedmeta("run", "--resume", str(run_dir), "--no-progress")
    out, err = resumed.communicate(timeout=300)

    assert left == f"{process.pid}\n"  # the killed run's lock file stays, unlocked, and is taken over
    assert resumed.returncode == 0, err
    assert out.splitlines()[0] == f"run directory           {run_dir}"
    assert rounds_in(run_dir) == list(range(1, 61))


def test_a_holder_that_has_locked_but_not_yet_written_its_pid_is_still_named(tmp_path):
    # a holder that writes its PID 0.3 s after taking the lock, as a busy machine may make any holder do
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"descriptor = os.open({str(tmp_path / '.lock')!r}, os.O_RDWR | os.O_CREAT, 0o644)\n"
        "fcntl.lockf(descriptor, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "time.sleep(0.3)\n"
        "os.pwrite(descriptor, f'{os.getpid()}\\n'.encode(), 0)\n"
        "sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(RunDirBusy, match=rf"another fedmeta process \(PID {holder.pid}\) is writing"):
            with locked(tmp_path):
                pass
    finally:
        holder.communicate("")
