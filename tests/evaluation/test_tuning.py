"""Choosing how to fine-tune on validation clients: the rule on hand-made numbers, and ``fedmeta eval --tune``."""

import json
import math

import numpy as np
import pytest

from fedmeta.cli import main
from fedmeta.evaluation import tuning
from fedmeta.evaluation.tasks import METRICS, Task, squared_error
from fedmeta.evaluation.tuning import tune_fine_tuning

GRID = (("sgd", 0.01), ("sgd", 0.1), ("adam", 0.001))


class Table:
    """Stands in for ``personalize``: each candidate's per-client numbers [clients], then [epochs, clients]."""

    def __init__(self, numbers):
        self.numbers = numbers

    def __call__(self, weights, clients, fine_tune, **_):
        initial, by_epoch = self.numbers[fine_tune]
        return type("Report", (), {"initial_of": lambda self, m: np.array(initial),
                                   "personalized_of": lambda self, m: np.array(by_epoch)})()


def tune(monkeypatch, numbers, task=Task()):
    monkeypatch.setattr(tuning, "personalize", Table(numbers))
    return tune_fine_tuning({}, [], lambda optimizer, lr, epochs: (optimizer, lr), engine=None, task=task, grid=GRID,
                            max_epochs=3)


def test_the_best_mean_over_candidates_and_epochs_wins_with_its_epoch_count(monkeypatch):
    chosen = tune(monkeypatch, {
        ("sgd", 0.01): ([0.1, 0.3], [[0.5, 0.5], [0.6, 0.6], [0.7, 0.6]]),  # best 0.65 after 3 epochs
        ("sgd", 0.1): ([0.1, 0.3], [[0.9, 0.6], [0.6, 0.6], [0.5, 0.5]]),   # best 0.75 after 1 epoch
        ("adam", 0.001): ([0.1, 0.3], [[0.4, 0.4], [0.5, 0.5], [0.6, 0.6]]),
    })

    assert (chosen.optimizer, chosen.lr, chosen.epochs) == ("sgd", 0.1, 1)
    assert chosen.score == pytest.approx(0.75)
    assert chosen.candidates[0].by_epoch == pytest.approx((0.5, 0.6, 0.65))
    assert chosen.candidates[0].initial == pytest.approx(0.2)


def test_equals_go_to_the_first_candidate_and_the_fewest_epochs(monkeypatch):
    same = ([0.0], [[0.8], [0.8], [0.8]])
    chosen = tune(monkeypatch, {("sgd", 0.01): ([0.0], [[0.7], [0.8], [0.8]]), ("sgd", 0.1): same,
                                ("adam", 0.001): same})

    assert (chosen.optimizer, chosen.lr, chosen.epochs) == ("sgd", 0.01, 2)


def test_for_an_error_metric_the_lowest_wins_and_a_diverged_candidate_never_does(monkeypatch):
    regression = Task(squared_error, (METRICS["mse"],))
    chosen = tune(monkeypatch, {("sgd", 0.01): ([2.0], [[1.5], [1.2], [1.1]]),
                                ("sgd", 0.1): ([2.0], [[math.nan], [math.nan], [math.nan]]),
                                ("adam", 0.001): ([2.0], [[0.9], [1.0], [1.3]])}, regression)

    assert (chosen.optimizer, chosen.lr, chosen.epochs, chosen.metric) == ("adam", 0.001, 1, "mse")


def test_when_every_candidate_diverges_the_tuning_says_so(monkeypatch):
    nan = ([0.0], [[math.nan]] * 3)
    with pytest.raises(ValueError, match="every fine-tuning candidate gave a accuracy that is not finite"):
        tune(monkeypatch, dict.fromkeys(GRID, nan))


# ---- through the CLI, on a tiny run ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_settings):
    output = tmp_path_factory.mktemp("tuned")
    assert main(["run", *tiny_settings(output, "rounds=2", "data.num_clients=20"), "--no-progress"]) == 0
    (run_dir,) = output.iterdir()
    return run_dir


def test_eval_tune_chooses_on_training_clients_and_evaluates_the_held_out_ones_as_eval_of_the_choice_would(
        tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--tune", "--output", str(tmp_path / "tuned.json")]) == 0
    tuned = json.loads((tmp_path / "tuned.json").read_text())
    choice = tuned["tuning"]
    chosen = (choice["optimizer"], choice["lr"], choice["epochs"])
    assert main(["eval", str(tiny_run), "--set", f"evaluation.fine_tune_optimizer={chosen[0]}", "--set",
                 f"evaluation.fine_tune_lr={chosen[1]}", "--set", f"evaluation.fine_tune_epochs={chosen[2]}",
                 "--output", str(tmp_path / "plain.json")]) == 0
    plain = json.loads((tmp_path / "plain.json").read_text())
    out = capsys.readouterr().out

    config = (tiny_run / "config.toml").read_text()
    assert "num_clients = 20" in config
    train_ids = {f"synthetic_{i:05d}" for i in range(20)} - set(tuned["client_ids"])
    assert set(choice["validation_client_ids"]) <= train_ids  # 5 held-out of 20; 4 of the 15 training validate
    assert len(choice["validation_client_ids"]) == 4
    best = None  # the highest validation accuracy in grid order, fewest epochs first
    for candidate in choice["candidates"]:
        for epochs, value in enumerate(candidate["by_epoch"], start=1):
            if best is None or value > best[0]:
                best = (value, candidate["optimizer"], candidate["lr"], epochs)
    assert chosen == best[1:]
    assert len(choice["candidates"]) == 9 and {len(c["by_epoch"]) for c in choice["candidates"]} == {10}
    assert {k: v for k, v in tuned.items() if k != "tuning"} == plain  # the held-out clients' bits, as eval gives
    assert f"chosen                  {chosen[0]} lr {chosen[1]:g}, {chosen[2]} epoch(s)" in out


def test_eval_tune_of_a_method_that_adapts_by_its_own_steps_is_refused_in_one_line(tmp_path, tiny_settings,
                                                                                   capsys):
    assert main(["run", *tiny_settings(tmp_path, "rounds=1", "algorithm.name=maml"), "--no-progress"]) == 0
    (run_dir,) = tmp_path.iterdir()
    capsys.readouterr()

    assert main(["eval", str(run_dir), "--tune"]) == 2
    assert capsys.readouterr().err == (
        "fedmeta: error: --tune: maml personalizes by its own adaptation steps (algorithm.inner_lr and its steps), "
        "not by evaluation.fine_tune_*; there is nothing to tune\n")


def test_eval_tune_of_training_clients_is_refused_in_one_line(tiny_run, capsys):
    assert main(["eval", str(tiny_run), "--tune", "--clients", "train"]) == 2
    assert capsys.readouterr().err == ("fedmeta: error: --tune chooses on training clients and evaluates the held-out "
                                       "ones; drop --clients train\n")
