"""``fedmeta runs``: each status of real tiny runs, their numbers against metrics.jsonl, compare, bad input."""

import json
import subprocess
import sys

import pytest

from fedmeta.cli import main
from fedmeta.experiment.run import DivergenceError, run_experiment
from fedmeta.experiment.run_dir import locked
from fedmeta.experiment.runs import list_runs, summarize_run


def raw_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def three_runs(tmp_path, tiny_config, crash_at_round, monkeypatch):
    """A finished run, one crashed as round 3 started (checkpoint after 2), one diverged at round 3; by name."""
    finished = run_experiment(tiny_config(tmp_path, "name=a-finished"), progress=False).run_dir
    crash_at_round(2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(tiny_config(tmp_path, "name=b-crashed", "checkpoint_every=1"), progress=False)
    monkeypatch.undo()
    # client lr 10 on Synthetic: round 3's loss is past 10 * ln(10) (see test_resume)
    with pytest.raises(DivergenceError):
        run_experiment(tiny_config(tmp_path, "name=c-diverged", "algorithm.client_lr=10", "checkpoint_every=1"),
                       progress=False)
    crashed, diverged = sorted(p for p in tmp_path.iterdir() if p != finished)
    return finished, crashed, diverged


def test_each_run_has_its_status_rounds_last_accuracies_and_wall_time_from_metrics(three_runs):
    summaries = list_runs(three_runs[0].parent)

    assert [s.run_dir for s in summaries] == list(three_runs)
    assert [(s.status, s.rounds_done, s.rounds) for s in summaries] == [
        ("finished", 3, 3), ("crashed", 2, 3), ("diverged", 3, 3)]
    for summary in summaries:
        rows = raw_rows(summary.run_dir)
        last_evaluated = [row for row in rows if "initial/accuracy" in row][-1]  # round 2 for the crashed one
        assert (summary.initial, summary.personalized) == (last_evaluated["initial/accuracy"],
                                                           last_evaluated["personalized/accuracy"])
        assert summary.wall_seconds == pytest.approx(sum(row["time/round_seconds"] for row in rows) + sum(
            row.get("time/evaluation_seconds", 0.0) for row in rows))
    assert summaries[1].curve().rounds == (2,) and summaries[0].curve().rounds == (2, 3)


def test_a_run_whose_lock_a_live_process_holds_is_running_and_one_a_dead_process_left_is_not(three_runs):
    crashed = three_runs[1]
    with locked(crashed):
        assert summarize_run(crashed).status == "running"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (crashed / ".lock").write_text(dead.stdout)  # a killed run's lock file, unlocked, names its dead PID
    assert summarize_run(crashed).status == "crashed"

    starting = crashed.with_name("d-starting")  # its process has written config.toml, not yet metrics.jsonl
    starting.mkdir()
    (starting / "config.toml").write_bytes((crashed / "config.toml").read_bytes())
    with locked(starting):
        assert summarize_run(starting)[1:6] == ("running", 0, 3, "accuracy", None)


def test_cli_lists_the_runs_and_compare_prints_the_table_and_writes_the_plot(three_runs, tmp_path, capsys):
    finished, crashed, _ = three_runs
    (tmp_path / "notes").mkdir()  # not a run: not listed

    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "status", "rounds", "initial", "personalized", "wall", "time"]
    assert [line.split()[:3] for line in lines[1:]] == [[path.name, status, rounds] for path, status, rounds in zip(
        three_runs, ("finished", "crashed", "diverged"), ("3/3", "2/3", "3/3"))]
    last = raw_rows(finished)[-1]
    assert lines[1].split()[3:5] == [f"{last['initial/accuracy']:.4f}", f"{last['personalized/accuracy']:.4f}"]

    plot = tmp_path / "both.png"
    assert main(["runs", "compare", str(finished), str(crashed), "--output", str(plot)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1:3] == lines[1:3] and out[3] == f"plot: {plot}"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input_is_one_line_and_exit_status_2(three_runs, tmp_path, capsys):
    finished = three_runs[0]
    (tmp_path / "notes").mkdir()
    assert main(["runs", "compare", str(tmp_path / "notes")]) == 2
    assert capsys.readouterr().err == f"fedmeta: error: {tmp_path / 'notes'}: not a fedmeta run directory (no " \
                                      "config.toml)\n"

    rows = raw_rows(finished)
    (finished / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [*rows, rows[-1]]))
    assert main(["runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"fedmeta: error: {finished / 'metrics.jsonl'}: line 4 holds round 3 after round 3")
    assert err.count("\n") == 1
