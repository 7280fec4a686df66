"""`fedmeta compare`: the equal budget by hand, paired intervals on hand-made clients, the smoke scale end to end."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from fedmeta.cli import main
from fedmeta.data.synthetic import synthetic
from fedmeta.experiment.compare import SCALES, plan_scale
from fedmeta.experiment.compare.methods import METHODS
from fedmeta.experiment.compare.plan import method_config, planned_samples, rounds_for
from fedmeta.experiment.compare.report import method_row, versus
from fedmeta.experiment.compare.search import candidates
from fedmeta.experiment.config import ExperimentConfig
from fedmeta.experiment.reproduce.findings import Curve, SeededRuns
from fedmeta.experiment.reproduce.plan import RunSpec
from fedmeta.experiment.reproduce.runs import RunRecord
from fedmeta.experiment.reproduce.verdicts import paired_differences, paired_interval

FULL = SCALES["full"]
FEMNIST = FULL.setting("femnist")._replace(budget=20_000)  # 10 clients a round, lr 0.02, batch 20


def config(method: str, choice=None, train_size: float = 136.0) -> ExperimentConfig:
    return method_config(FULL, FEMNIST, METHODS[method], choice or {}, 42, name=method, output_dir=Path("runs"),
                         train_size=train_size)


# ---- the equal budget -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, rounds", [
    ("fedavg", 15),     # 20,000 / (10 clients x 1 epoch x 136 examples) = 14.7
    ("fedprox", 15),    # the same arithmetic as FedAvg
    ("reptile", 10),    # 20,000 / (10 x 10 steps x 20) = 10
    ("fomaml", 25),     # 20,000 / (10 x (3 support + 1 query) x 20) = 25
    ("maml", 25),
    ("perfedavg", 10),  # 20,000 / (10 x 5 steps x 2 batches x 20) = 10
    ("ditto", 7),       # 20,000 / (10 x (1 global + 1 personal epoch) x 136) = 7.4
    ("fedrep", 7),      # 20,000 / (10 x (1 head + 1 body epoch) x 136) = 7.4
    ("fedper", 15),     # one epoch of body and head together, as FedAvg
    ("pfedme", 7),      # 20,000 / (10 x 5 local steps x 3 inner steps x 20) = 6.7
    ("scaffold", 15),   # one epoch, as FedAvg
    ("local_only", 1),  # trains nothing: one round to evaluate
])
def test_each_method_gets_the_rounds_that_spend_the_budget(method, rounds):
    assert config(method).rounds == rounds


def test_fedrep_counts_its_head_epochs_and_keeps_the_settings_output_layer():
    run = config("fedrep", {"algorithm.head_epochs": 3})

    assert run.rounds == 4  # 20,000 / (10 x (3 head + 1 body epochs) x 136) = 3.7
    assert run.model.personal == ("classifier.3",) == config("fedper").model.personal
    assert config("fedavg").model.personal == ()


def test_two_stage_spends_half_the_budget_in_each_stage():
    run = config("two_stage")

    assert run.algorithm.switch_round == 7  # 10,000 / (10 x 1 x 136) = 7.35
    assert run.rounds == 7 + 5  # then 10,000 / (10 x 10 x 20) = 5
    assert planned_samples(run, 136.0) == 10 * (7 * 136 + 5 * 200)


def test_per_fedavg_hf_counts_its_hessian_batch():
    hf = dataclasses.replace(config("perfedavg").algorithm, variant="hf")

    assert rounds_for(METHODS["perfedavg"], hf, 20_000, 136.0) == (7, None)  # 20,000 / (10 x 5 x 3 x 20) = 6.7


def test_scaled_knobs_are_factors_of_the_settings_client_lr_and_reach_the_config():
    points = candidates(METHODS["fomaml"], FEMNIST)

    assert points == [{"algorithm.server_lr": pytest.approx(0.02)}, {"algorithm.server_lr": pytest.approx(0.1)}]
    assert config("fomaml", points[1]).algorithm.server_lr == pytest.approx(0.1)
    assert config("local_only", {"evaluation.fine_tune_lr": 0.06}).evaluation.fine_tune_lr == 0.06
    assert config("local_only").evaluation.fine_tune_epochs == 5  # its own, to train from scratch


def test_the_validation_split_holds_training_clients_only():
    dataset = synthetic(40, seed=3)

    split = dataset.validation_split(3)

    assert set(split.clients) == set(dataset.train_ids)
    assert set(split.train_ids) | set(split.held_out_ids) == set(dataset.train_ids)
    assert not set(split.held_out_ids) & set(split.train_ids)
    assert len(split.held_out_ids) == round(len(dataset.train_ids) * 900 / 3400)


# ---- paired intervals on hand-made clients --------------------------------------------------------------------

def record(ids, initial, personalized, samples=100.0):
    spec = RunSpec("x", ExperimentConfig())
    history = [{"round": 0, "time/samples_per_second": samples, "time/round_seconds": 2.0,
                "time/evaluation_seconds": 1.0}]
    evaluation = {"client_ids": ids, "initial_accuracy": initial,
                  "personalized_accuracy": [[0.0, p] for p in personalized]}  # the last stage counts
    return RunRecord(spec, Path(f"run-{len(ids)}"), history, evaluation)


def runs(*records):
    return SeededRuns("m", tuple(r.spec for r in records), records)


def test_one_seed_pairs_personalized_accuracy_client_by_client():
    ours = runs(record(["a", "b", "c"], [0.1, 0.1, 0.1], [0.6, 0.8, 0.7]))
    floor = runs(record(["a", "b", "c"], [0.1, 0.1, 0.1], [0.5, 0.6, 0.7]))

    interval = versus(ours, floor)

    assert interval.mean == pytest.approx(0.1)  # differences 0.1, 0.2, 0.0
    assert interval.half_width == pytest.approx(4.303 * 0.1 / 3 ** 0.5)  # sd 0.1, t(2)


def test_three_seeds_pair_within_each_seed_and_interval_over_the_seed_means():
    ours = runs(record(["a", "b"], [0, 0], [0.6, 0.8]), record(["c", "d"], [0, 0], [0.5, 0.5]),
                record(["e", "f"], [0, 0], [0.9, 0.7]))
    floor = runs(record(["a", "b"], [0, 0], [0.5, 0.5]), record(["c", "d"], [0, 0], [0.3, 0.5]),
                 record(["e", "f"], [0, 0], [0.7, 0.6]))

    interval = versus(ours, floor)

    # seed means of the differences: 0.2, 0.1, 0.15 -> mean 0.15, sd 0.05
    assert interval.mean == pytest.approx(0.15)
    assert interval.half_width == pytest.approx(4.303 * 0.05 / 3 ** 0.5)


def test_clients_that_differ_are_refused_not_paired():
    ours = runs(record(["a", "b", "c"], [0, 0, 0], [0.6, 0.8, 0.7]))
    floor = runs(record(["a", "b", "d"], [0, 0, 0], [0.5, 0.6, 0.7]))

    with pytest.raises(ValueError, match=r"cannot pair per-client numbers of different held-out clients: 1 client\(s\) "
                                         r"only in the first, 1 only in the second \(e.g. 'd'\)"):
        versus(ours, floor)


def test_the_same_clients_in_another_order_are_refused_too():
    with pytest.raises(ValueError, match="the same clients in another order"):
        paired_differences(["a", "b"], [0.1, 0.2], ["b", "a"], [0.2, 0.1], "x")


def test_a_table_row_shows_gain_hurt_samples_and_time_from_the_runs():
    three = runs(*(record(["a", "b", "c"], [0.5, 0.5, 0.5], [0.7, 0.4, 0.9], samples=50.0) for _ in range(3)))

    row = method_row(three, None)

    gain = paired_interval([np.array([0.2, -0.1, 0.4])] * 3)
    assert row[3] == str(gain)  # +0.1667 [+0.1667, +0.1667]: every seed's mean gain is the same
    assert row[4] == "33.3%"  # one client in three is hurt
    assert row[5] == "100"  # 50 samples/s for 2 s
    assert row[6] == "3.0 s"  # 2 s training and 1 s evaluation per seed


def test_a_method_with_a_seed_that_did_not_finish_says_how_many_did_and_is_not_paired():
    done = record(["a", "b"], [0.5, 0.5], [0.7, 0.9])
    one_diverged = SeededRuns("m", (done.spec,) * 3, (done, None, done))

    row = method_row(one_diverged, runs(done, done, done))

    assert row == ["m", "2 of 3 seeds finished (see Missing runs)", "—", "—", "—", "—", "—", "—"]


def test_thirteen_methods_get_thirteen_colors_and_one_legend_entry_each(tmp_path, monkeypatch):
    from fedmeta.experiment.reproduce import figures

    drawn = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig))
    curves = {f"method {i}": Curve((1, 2), (0.1, 0.2), (0.5, 0.6)) for i in range(13)}

    figures.plot_curves({"synthetic": curves}, tmp_path / "curves.png")

    (ax,) = drawn[0].axes
    solid = [line for line in ax.get_lines() if line.get_linestyle() == "-"]
    assert len(ax.get_lines()) == 26 and len(solid) == 13  # personalized solid, initial dashed
    assert len({line.get_color() for line in solid}) == 13
    assert [t.get_text() for t in drawn[0].legends[0].get_texts()] == [*curves, "personalized", "initial"]


# ---- the smoke scale end to end -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    output = tmp_path_factory.mktemp("compare")
    code = main(["compare", "--scale", "smoke", "--methods", "fedavg,maml,fedrep,local_only", "--output", str(output),
                 "--no-progress"])
    return output, code


@pytest.mark.slow
def test_smoke_runs_every_method_at_three_seeds_and_writes_the_report(smoke):
    output, code = smoke

    report = (output / "smoke" / "report.md").read_text()

    assert code == 0
    assert len(list((output / "smoke" / "runs").iterdir())) == 4 * 3
    assert len(list((output / "smoke" / "search").glob("*.json"))) == 4 * 2  # two candidates per method
    for name in ("synthetic_accuracy_over_rounds.png", "synthetic_gain_distribution.png"):
        assert (output / "smoke" / "plots" / name).stat().st_size > 0
    assert ("| method | initial | personalized | gain (95%, paired) | clients hurt | client samples | wall time"
            in report)
    assert "**(chosen)**" in report


@pytest.mark.slow
def test_the_reports_samples_are_the_runs_own(smoke):
    output, _ = smoke
    report = (output / "smoke" / "report.md").read_text()
    run_dirs = sorted((output / "smoke" / "runs").glob("synthetic-fedavg-s*"))

    spent = []
    for run_dir in run_dirs:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        spent.append(round(sum(r["time/samples_per_second"] * r["time/round_seconds"] for r in rows)))

    fedavg = next(line for line in report.splitlines() if line.startswith("| FedAvg |"))
    assert f"| {np.mean(spent):,.0f} |" in fedavg


@pytest.mark.slow
def test_running_again_skips_every_run_and_every_trial(smoke, capsys):
    output, _ = smoke
    before = sorted(p.name for p in (output / "smoke" / "runs").iterdir())

    code = main(["compare", "--scale", "smoke", "--methods", "fedavg,maml,fedrep,local_only", "--output", str(output),
                 "--no-progress"])

    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert sorted(p.name for p in (output / "smoke" / "runs").iterdir()) == before
    assert sum(line.endswith("; skipped") and line.startswith("search ") for line in lines) == 8
    assert sum(line.endswith("; skipped") and line.startswith("synthetic-") for line in lines) == 12
    assert not any("starting" in line for line in lines)


# ---- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--methods", "fedavg,ditt0"], "fedmeta: error: method 'ditt0': expected one of fedavg, fedprox, reptile, "
                                    "two_stage, fomaml, maml, perfedavg, ditto, fedrep, fedper, pfedme, scaffold, "
                                    "local_only"),
    (["--seeds", "2"], "fedmeta: error: --seeds 2: a comparison needs at least 3 seeds (its intervals are over "
                       "the seeds)"),
    (["--datasets", "cifar"], "fedmeta: error: dataset 'cifar': scale 'smoke' has synthetic"),
    (["--methods", "fedavg,fedavg"], "fedmeta: error: method 'fedavg' is given twice"),
    (["--methods", ","], "fedmeta: error: no method to compare: give at least one of fedavg, fedprox, reptile, "
                         "two_stage, fomaml, maml, perfedavg, ditto, fedrep, fedper, pfedme, scaffold, local_only"),
])
def test_bad_input_is_one_line_exit_2_and_runs_nothing(tmp_path, capsys, args, message):
    code = main(["compare", "--scale", "smoke", "--output", str(tmp_path / "out"), *args])

    assert code == 2
    assert capsys.readouterr().err.splitlines() == [message]
    assert not (tmp_path / "out").exists()


def test_fewer_than_three_seeds_are_refused_by_the_library_too():
    with pytest.raises(ValueError, match="at least 3 seeds"):
        plan_scale("smoke", seeds=1)


def test_a_missing_femnist_is_one_line_naming_the_default_data_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDMETA_SHARED_DATA", str(tmp_path / "nowhere"))

    code = main(["compare", "--scale", "full", "--datasets", "femnist", "--output", str(tmp_path / "out")])

    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == 1
    assert err[0].startswith(f"fedmeta: error: data directory {tmp_path / 'nowhere'} (the default; pass --data-dir): "
                             "no such directory")
    assert not (tmp_path / "out").exists()
