"""One round numbering: ``round`` counts rounds done, in metrics.jsonl, evaluation.json, plots and thresholds."""

import json

import pytest

import fedmeta.plots as plots
from fedmeta.cli import format_history
from fedmeta.experiment.checkpoint import read_checkpoint
from fedmeta.experiment.run import resume_experiment, run_experiment
from fedmeta.experiment.run_dir import read_metrics


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config):
    """The tiny run (3 rounds, evaluated after rounds 2 and 3), with thresholds it reaches; tests only read it."""
    return run_experiment(tiny_config(tmp_path_factory.mktemp("rounds"), "evaluation.thresholds=[0.01]",
                                      "checkpoint_every=2"), progress=False)


def plotted_rounds(monkeypatch, history, tmp_path):
    """The x values of the accuracy and the train loss panels of ``accuracy_over_rounds.png``."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    plots.plot_accuracy_over_rounds(history, tmp_path / "accuracy.png")
    top, bottom = figures[0].axes
    return [list(line.get_xdata()) for line in (top.lines[0], bottom.lines[0])]


def test_the_row_written_after_the_first_round_is_round_1(finished):
    rows = [json.loads(line) for line in (finished.run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluation = json.loads((finished.run_dir / "evaluation.json").read_text())
    checkpoint = read_checkpoint(finished.run_dir / "checkpoint.pt")

    assert [row["round"] for row in rows] == [1, 2, 3]
    assert evaluation["round"] == checkpoint.rounds_done == finished.config.rounds == 3


def test_rounds_to_threshold_is_the_round_of_the_first_row_that_reached_it(finished):
    evaluation = json.loads((finished.run_dir / "evaluation.json").read_text())

    reached = evaluation["rounds_to_threshold"]["personalized/accuracy"]["0.01"]

    first = next(row for row in finished.history if row.get("personalized/accuracy", 0) >= 0.01)
    assert reached == first["round"] == 2  # the first evaluation ends round 2


def test_plots_and_history_show_the_rounds_metrics_jsonl_holds(finished, monkeypatch, tmp_path):
    rows = finished.history

    accuracy_x, loss_x = plotted_rounds(monkeypatch, rows, tmp_path)
    table = format_history(rows, every_round=True).splitlines()[1:]

    assert accuracy_x == [2, 3] and loss_x == [1, 2, 3]
    assert [int(line.split()[0]) for line in table] == [1, 2, 3]


def test_metrics_an_older_fedmeta_counted_from_0_are_read_as_rounds_done(finished, monkeypatch, tmp_path):
    old = tmp_path / "old-run"
    old.mkdir()
    rows = [json.loads(line) for line in (finished.run_dir / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps({**row, "round": row["round"] - 1}) + "\n" for row in rows))

    read = read_metrics(old)

    assert read == rows
    assert plotted_rounds(monkeypatch, read, tmp_path) == [[2, 3], [1, 2, 3]]


def test_a_run_an_older_fedmeta_began_is_refused_on_resume_in_one_line(tmp_path, tiny_config, monkeypatch,
                                                                         crash_at_round):
    crash_at_round(2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(tmp_path, "checkpoint_every=2"), progress=False)
    monkeypatch.undo()
    (run_dir,) = tmp_path.iterdir()
    path = run_dir / "metrics.jsonl"
    # what an older fedmeta wrote: the same lines, rounds from 0 (one digit each, so the byte size is the same)
    path.write_text("".join(json.dumps({**row, "round": row["round"] - 1}) + "\n" for row in read_metrics(run_dir)))

    with pytest.raises(ValueError) as error:
        resume_experiment(run_dir, progress=False)

    assert str(error.value) == (f"{path}: rounds counted from 0, as an older fedmeta wrote them; this version counts "
                                "rounds done and cannot continue the run (it can still evaluate, plot and report "
                                "it), so start it again")
