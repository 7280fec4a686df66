"""Crash safety: atomic checkpoints, resume with the same bits, weights-only loading, divergence stop."""

import io
import json
import math
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

import fedmeta.experiment.run as run_module
from fedmeta.cli import main
from fedmeta.experiment.checkpoint import CHECKPOINT_FORMAT, load_checkpoint, read_checkpoint
from fedmeta.experiment.config import ConfigError, load_config
from fedmeta.experiment.run import DivergenceError, resume_experiment, run_experiment
from run_cases import without_times

# the shared tiny experiment, over 5 rounds with checkpoints after rounds 2, 4 and 5; momentum
# gives server state to restore
RESUMABLE = ("rounds=5", "algorithm.server_momentum=0.9", "evaluation.fine_tune_epochs=1", "checkpoint_every=2")
# Long enough (about 20-200 ms a round) to be killed mid-run; momentum gives server state to restore
KILLED = [
    "data.num_clients=24", "data.held_out_fraction=0.25", "rounds=20", "algorithm.cohort_size=4",
    "algorithm.local_epochs=2", "algorithm.server_momentum=0.9", "evaluation.every=5",
    "evaluation.fine_tune_epochs=1", "evaluation.max_clients=3", "checkpoint_every=3", "engine.workers=0",
]
_moments = random.Random(6)
# (metrics lines to wait for, then seconds more, engine.workers): all after the first checkpoint (3 lines)
KILL_MOMENTS = [
    pytest.param(lines, seconds, workers, id=f"after-{lines}-lines-workers-{workers}")
    for lines, seconds, workers in [(_moments.randint(4, 15), _moments.uniform(0, 0.05), w) for w in (0, 2)]
]


def the_run_dir(output_dir):
    (run_dir,) = output_dir.iterdir()
    return run_dir


def metrics_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def evaluations(run_dir):
    return [json.loads(line) for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]


def assert_same_state(checkpoint, expected):
    assert checkpoint.rounds_done == expected.rounds_done
    for key in expected.state.weights:
        assert torch.equal(checkpoint.state.weights[key], expected.state.weights[key])
    for key in expected.state.server["velocity"]:
        assert torch.equal(checkpoint.state.server["velocity"][key], expected.state.server["velocity"][key])


def scripted_losses(monkeypatch, losses):
    """Runs the real rounds but reports ``losses[round]`` as the round's client/train_loss."""
    real = run_module.run_round

    def scripted(*args, round_idx, **kwargs):
        state, metrics = real(*args, round_idx=round_idx, **kwargs)
        return state, {**metrics, "client/train_loss": losses[round_idx]}

    monkeypatch.setattr(run_module, "run_round", scripted)


def fedmeta_command(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same threads in every process, and no spinning on 2 cores
    return subprocess.Popen([sys.executable, "-m", "fedmeta", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def settings(*overrides):
    return [item for override in overrides for item in ("--set", override)]


def lines_after_first_checkpoint(output_dir):
    """Metrics lines of the only run in ``output_dir``, once it has its first checkpoint (else 0)."""
    run_dir = next(output_dir.iterdir(), None)
    if run_dir is None or not (run_dir / "checkpoint.pt").exists():
        return 0
    return (run_dir / "metrics.jsonl").read_bytes().count(b"\n")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run directory of the KILLED config, run by the CLI from start to end."""
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    process = fedmeta_command("run", "--no-progress", *settings(*KILLED, f"output_dir={output_dir}"))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr.decode()
    return the_run_dir(output_dir)


@pytest.fixture(scope="module")
def tiny_config(tiny_config):
    """The shared tiny config made resumable: ``tiny_config(output_dir, *overrides)``."""
    return lambda output_dir, *overrides: tiny_config(output_dir, *RESUMABLE, *overrides)


@pytest.fixture(scope="module")
def uninterrupted_tiny(tmp_path_factory, tiny_config):
    """The tiny config run in this process from start to end; tests only read it."""
    return run_experiment(tiny_config(tmp_path_factory.mktemp("uninterrupted-tiny")), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("lines, seconds, workers", KILL_MOMENTS)
@pytest.mark.bits
def test_run_killed_at_a_random_moment_and_resumed_ends_with_the_same_bits(tmp_path, uninterrupted, lines,
                                                                            seconds, workers):
    process = fedmeta_command("run", "--no-progress",
                              *settings(*KILLED, f"engine.workers={workers}", f"output_dir={tmp_path}"))
    while lines_after_first_checkpoint(tmp_path) < lines and process.poll() is None:
        time.sleep(0.002)
    time.sleep(seconds)
    still_running = process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)  # the run and its workers, as a machine crash would
    process.wait(timeout=30)
    run_dir = the_run_dir(tmp_path)

    resumed = fedmeta_command("run", "--resume", str(run_dir), "--no-progress")
    _, stderr = resumed.communicate(timeout=120)

    assert still_running, "the run ended before it could be killed"
    assert resumed.returncode == 0, stderr.decode()
    assert_same_state(read_checkpoint(run_dir / "checkpoint.pt"), read_checkpoint(uninterrupted / "checkpoint.pt"))
    assert without_times(metrics_rows(run_dir)) == without_times(metrics_rows(uninterrupted))
    assert (json.loads((run_dir / "evaluation.json").read_text())
            == json.loads((uninterrupted / "evaluation.json").read_text()))
    assert evaluations(run_dir) == evaluations(uninterrupted)


def test_checkpoints_are_written_every_n_rounds_and_after_the_last(tmp_path, monkeypatch, tiny_config):
    written = []
    real = run_module.save_checkpoint
    monkeypatch.setattr(run_module, "save_checkpoint",
                        lambda path, checkpoint: (written.append(checkpoint.rounds_done), real(path, checkpoint)))

    result = run_experiment(tiny_config(tmp_path), progress=False)

    checkpoint = read_checkpoint(result.run_dir / "checkpoint.pt")
    assert written == [2, 4, 5]
    assert checkpoint.metrics_offset == (result.run_dir / "metrics.jsonl").stat().st_size
    assert torch.equal(checkpoint.torch_rng_state, torch.get_rng_state())


def test_a_crash_while_writing_a_checkpoint_leaves_the_previous_one_whole(tmp_path, monkeypatch, tiny_config):
    real_save = torch.save
    calls = []

    def save_half_then_fail(payload, file):
        calls.append(1)
        if len(calls) < 2:
            return real_save(payload, file)
        whole = io.BytesIO()
        real_save(payload, whole)
        file.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        raise OSError("no space left on device (simulated)")

    monkeypatch.setattr(torch, "save", save_half_then_fail)

    with pytest.raises(OSError, match="simulated"):
        run_experiment(tiny_config(tmp_path / "crashed"), progress=False)

    run_dir = the_run_dir(tmp_path / "crashed")
    assert read_checkpoint(run_dir / "checkpoint.pt").rounds_done == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.toml", "evaluations.jsonl",
                                                          "metrics.jsonl", "provenance.json"]


def test_resume_after_the_last_checkpoint_write_failed_ends_like_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                                      tiny_config, uninterrupted_tiny):
    real_save = torch.save
    calls = []

    def fail_the_last_save(payload, file):  # after 5 rounds, with evaluation.json already written
        calls.append(1)
        if len(calls) == 3:
            file.write(b"PK\x03\x04 half a zip")
            raise OSError("no space left on device (simulated)")
        return real_save(payload, file)

    monkeypatch.setattr(torch, "save", fail_the_last_save)
    with pytest.raises(OSError, match="simulated"):
        run_experiment(tiny_config(tmp_path / "crashed"), progress=False)
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "crashed")

    resumed = resume_experiment(run_dir, progress=False)

    expected = uninterrupted_tiny.run_dir
    assert_same_state(read_checkpoint(run_dir / "checkpoint.pt"), read_checkpoint(expected / "checkpoint.pt"))
    assert without_times(metrics_rows(run_dir)) == without_times(metrics_rows(expected))
    assert without_times(resumed.history) == without_times(metrics_rows(expected))
    assert resumed.report.metrics() == uninterrupted_tiny.report.metrics()
    assert (json.loads((run_dir / "evaluation.json").read_text())
            == json.loads((expected / "evaluation.json").read_text()))


def test_resume_cuts_the_lines_after_the_checkpoint_and_a_torn_last_line(tmp_path, monkeypatch, tiny_config,
                                                                         uninterrupted_tiny, crash_at_round):
    crash_at_round(3)  # the checkpoint holds 2 rounds; round 2's line is written after it
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path / "crashed"), progress=False)
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path / "crashed")
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write('{"round": 4, "client/tra')  # the crash tore this line
    expected = uninterrupted_tiny.run_dir
    (last,) = [e for e in evaluations(expected) if e["round"] == 4]
    with open(run_dir / "evaluations.jsonl", "a") as file:  # an evaluation after the checkpoint, then a torn one
        file.write(json.dumps({**last, "initial_accuracy": [0.0] * len(last["initial_accuracy"])}) + "\n")
        file.write('{"round": 5, "client_i')

    resume_experiment(run_dir, progress=False)

    assert [row["round"] for row in metrics_rows(run_dir)] == [1, 2, 3, 4, 5]
    assert without_times(metrics_rows(run_dir)) == without_times(metrics_rows(expected))
    assert (json.loads((run_dir / "evaluation.json").read_text())
            == json.loads((expected / "evaluation.json").read_text()))
    # every evaluation once, the last one as evaluation.json has it (evaluated every 2 rounds and after the last)
    assert [e["round"] for e in evaluations(run_dir)] == [2, 4, 5]
    assert evaluations(run_dir) == evaluations(expected)
    assert evaluations(run_dir)[-1].items() <= json.loads((expected / "evaluation.json").read_text()).items()


class RunsCode:
    """Unpickling this calls ``Path.touch(marker)``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


@pytest.fixture
def hostile_checkpoint(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "code-ran"
    torch.save({"format": CHECKPOINT_FORMAT, "weights": RunsCode(marker)}, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_and_the_code_never_runs(hostile_checkpoint):
    path, marker = hostile_checkpoint

    with pytest.raises(ValueError, match=r"checkpoint.pt: refused: the file holds objects other than tensors "
                                         r"and plain data \(the first refused: getattr\), and loading them "
                                         r"could run code$"):
        load_checkpoint(path)

    assert not marker.exists()


def test_the_refused_checkpoint_does_run_code_when_unpickled_fully(hostile_checkpoint):
    path, marker = hostile_checkpoint

    torch.load(path, weights_only=False)  # proves the refusal above is not vacuous

    assert marker.exists()


def test_a_truncated_checkpoint_is_refused_in_one_line_naming_the_file(tmp_path, tiny_config):
    result = run_experiment(tiny_config(tmp_path), progress=False)
    path = result.run_dir / "checkpoint.pt"
    path.write_bytes(path.read_bytes()[:1000])

    with pytest.raises(ValueError, match=r"checkpoint.pt: not a fedmeta checkpoint: the file is truncated or "
                                         r"corrupted \(RuntimeError: PytorchStreamReader failed reading zip "
                                         r"archive: failed finding central directory\)$"):
        resume_experiment(result.run_dir, progress=False)


def test_huge_client_lr_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, tiny_config):
    # client lr 10 (500 times the default) on Synthetic: losses 12.6, 19.4, then 33.7 > 10 * ln(10) = 23.03
    config = tiny_config(tmp_path, "algorithm.client_lr=10", "checkpoint_every=1")

    with pytest.raises(DivergenceError, match=r"^diverged at round 3: client/train_loss = 33\.66 is more than "
                                              r"divergence_factor = 10 times ln\(10\) = 2\.303, the loss of a "
                                              r"uniform guess; stopped, .*checkpoint.pt keeps the run after 2 "
                                              r"rounds \(lower algorithm.client_lr or raise divergence_factor\)$"):
        run_experiment(config, progress=False)

    run_dir = the_run_dir(tmp_path)
    checkpoint = read_checkpoint(run_dir / "checkpoint.pt")
    assert checkpoint.rounds_done == 2  # round 2's state, diverged, was never written
    assert [row["round"] for row in metrics_rows(run_dir)] == [1, 2, 3]  # the diverged round is logged
    assert checkpoint.metrics_offset < (run_dir / "metrics.jsonl").stat().st_size


def test_a_loss_just_above_factor_times_ln_classes_stops_the_run_and_one_at_it_does_not(tmp_path, monkeypatch,
                                                                                         tiny_config):
    at_threshold = 2 * math.log(10)  # divergence_factor 2, 10 classes
    scripted_losses(monkeypatch, [1.0, at_threshold, at_threshold * 1.001, 1.0, 1.0])

    with pytest.raises(DivergenceError, match=r"^diverged at round 3: client/train_loss = 4\.61 is more than "
                                              r"divergence_factor = 2 times ln\(10\) = 2\.303"):
        run_experiment(tiny_config(tmp_path, "divergence_factor=2"), progress=False)


def test_a_non_finite_loss_stops_the_run_naming_the_round(tmp_path, monkeypatch, tiny_config):
    scripted_losses(monkeypatch, [1.0, math.nan, 1.0, 1.0, 1.0])

    with pytest.raises(DivergenceError, match=r"^diverged at round 2: client/train_loss = nan is not finite; "
                                              r"stopped, no checkpoint was written yet"):
        run_experiment(tiny_config(tmp_path, "divergence_factor=inf"), progress=False)


def test_cli_reports_divergence_in_one_line_with_exit_status_2(tmp_path, capsys, tiny_settings):
    code = main(["run", "--no-progress", *tiny_settings(tmp_path, *RESUMABLE, "algorithm.client_lr=10")])

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedmeta: error: diverged at round 3: client/train_loss = 33.66 is more than")
    assert err.count("\n") == 1


def test_cli_resume_continues_a_crashed_run(tmp_path, monkeypatch, capsys, tiny_config, crash_at_round):
    crash_at_round(3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path), progress=False)
    monkeypatch.undo()
    run_dir = the_run_dir(tmp_path)

    code = main(["run", "--resume", str(run_dir), "--no-progress"])

    out = capsys.readouterr().out
    assert code == 0
    assert out.startswith(f"run directory           {run_dir}\n")
    assert "algorithm               fedavg, 5 rounds" in out
    assert read_checkpoint(run_dir / "checkpoint.pt").rounds_done == 5


@pytest.mark.parametrize("extra", [["synthetic"], ["--set", "rounds=9"]])
def test_cli_resume_refuses_a_config_or_overrides(tmp_path, capsys, extra):
    code = main(["run", "--resume", str(tmp_path), *extra])

    assert code == 2
    assert capsys.readouterr().err == (f"fedmeta: error: --resume {tmp_path}: a resumed run keeps the config it "
                                       "started with; drop CONFIG and --set (or start a new run)\n")


def test_resume_without_a_checkpoint_says_the_run_must_start_again(tmp_path, monkeypatch, tiny_config, crash_at_round):
    crash_at_round(1)  # after one round, before the first checkpoint (after two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path), progress=False)
    run_dir = the_run_dir(tmp_path)

    with pytest.raises(FileNotFoundError, match=r"checkpoint.pt: no checkpoint to resume from; the run stopped "
                                                r"before its first checkpoint, so start it again with "
                                                r"`fedmeta run .*config.toml`$"):
        resume_experiment(run_dir, progress=False)


def test_resume_of_a_finished_run_says_there_is_nothing_to_resume(uninterrupted_tiny):
    with pytest.raises(ValueError, match=r"the run already finished all 5 rounds; nothing to resume$"):
        resume_experiment(uninterrupted_tiny.run_dir, progress=False)


def test_resume_refuses_a_config_toml_changed_since_the_checkpoint(tmp_path, monkeypatch, tiny_config, crash_at_round):
    crash_at_round(3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path), progress=False)
    run_dir = the_run_dir(tmp_path)
    config_file = run_dir / "config.toml"
    config_file.write_text(config_file.read_text().replace("rounds = 5", "rounds = 9"))

    with pytest.raises(ValueError, match=r"config.toml: differs from the config in checkpoint.pt; a resumed run "
                                         r"continues as it was configured"):
        resume_experiment(run_dir, progress=False)


def test_resume_of_a_missing_directory_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"run directory not found: .*nowhere$"):
        resume_experiment(tmp_path / "nowhere")


@pytest.mark.parametrize("override, message", [
    ("checkpoint_every=0", r"checkpoint_every = 0: expected at least 1"),
    ("divergence_factor=1", r"divergence_factor = 1.0: expected a factor > 1 \(inf: stop on non-finite losses only\)"),
    ("divergence_factor=nan", r"divergence_factor = nan: expected a factor > 1"),
])
def test_bad_checkpoint_and_divergence_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
