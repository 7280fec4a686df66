"""The privacy study (`fedmeta privacy-study`): its runs differ only in privacy, its report shows their own numbers."""

import dataclasses
import json
import re
import shutil

import numpy as np
import pytest

from fedmeta.cli import main
from fedmeta.experiment.config import PrivacyConfig
from fedmeta.experiment.privacy_study import STUDIES, population_rows, study_runs
from run_cases import write_tiny_data

pytest.importorskip("dp_accounting")

SMOKE = STUDIES["smoke"]


def test_the_runs_differ_from_the_run_without_privacy_in_their_privacy_and_name_alone(tmp_path):
    reference, *private = study_runs(STUDIES["full"], tmp_path, tmp_path)

    assert reference.config.privacy == PrivacyConfig() and not reference.config.privacy.enabled
    assert [p.config.privacy.target_epsilon for p in private] == [8.0, 3.0, 1.0]
    for run in private:
        assert run.config.privacy.sampling == "poisson" and run.config.privacy.delta == 1e-3
        assert dataclasses.replace(run.config, privacy=PrivacyConfig(), name=reference.name) == reference.config
    assert len({run.name for run in (reference, *private)}) == 4


def test_larger_populations_keep_the_cohort_or_the_sampling_rate_and_the_noise_on_the_mean_is_z_c_over_m():
    calls = []

    def calibrate(epsilon, rounds, cohort, population, delta, accountant, sampling):
        calls.append((epsilon, rounds, cohort, population, delta, accountant, sampling))
        return 2.0

    rows = population_rows(STUDIES["full"], 291, 1_000_000, calibrate)

    # same rate: 20/291 of a million is 68,729 clients a round; δ = 10^6^−1.1 ≈ 2.5e-7, below the study's 1e-3
    assert [row[3:5] for row in rows[:2]] == [["same cohort", "20"], ["same rate", "68,729"]]
    assert rows[0][6] == f"{2.0 * 1.0 / 20:.2e}" and rows[1][6] == f"{2.0 * 1.0 / 68_729:.2e}"
    assert calls[0] == (1.0, 100, 20, 1_000_000, pytest.approx(1e6 ** -1.1), "rdp", "poisson")
    assert [row[0] for row in rows] == ["1", "1", "3", "3", "8", "8"]
    # at the study's own population the two ways are one: a row each, and no calibration twice
    calls.clear()
    own = population_rows(STUDIES["full"], 291, 291, calibrate)
    assert [row[3:5] for row in own] == [["same cohort", "20"]] * 3 and len(calls) == 3


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """`fedmeta privacy-study --scale smoke` on tiny data: (output dir, report text)."""
    root = tmp_path_factory.mktemp("privacy")
    data = write_tiny_data(root / "data", shakespeare=False)
    assert main(["privacy-study", "--scale", "smoke", "--data-dir", str(data), "--output", str(root / "runs"),
                 "--no-progress"]) == 0
    return data, root / "runs", (root / "runs" / "smoke" / "report.md").read_text()


def evaluation(runs, name):
    (run_dir,) = (runs / "smoke").glob(f"fedavg-c3-e1-{name}-s42-*")
    return json.loads((run_dir / "evaluation.json").read_text())


def report_row(report, label):
    (row,) = [line for line in report.splitlines() if line.startswith(f"| {label} |")]
    return [cell.strip() for cell in row.strip("|").split("|")]


@pytest.mark.slow
def test_the_report_pairs_each_private_run_with_the_run_without_privacy_writer_by_writer(smoke_study):
    _, runs, report = smoke_study
    reference = evaluation(runs, "nodp")
    for name, label, target in (("eps8", "ε = 8", 8.0), ("eps1", "ε = 1", 1.0)):
        private = evaluation(runs, name)
        assert private["client_ids"] == reference["client_ids"]
        privacy = private["privacy"]
        assert privacy["epsilon"] <= target and privacy["sampling"] == "poisson" and privacy["adaptive_clipping"]
        row = report_row(report, label)
        assert row[1] == f"{privacy['epsilon']:.3f} ({privacy['delta']:g})"
        assert row[2] == f"{privacy['noise_multiplier']:.4f}"
        initial = np.subtract(private["initial_accuracy"], reference["initial_accuracy"]).mean()
        assert row[8].startswith(f"{initial:+.4f}")
        personalized = np.subtract([a[-1] for a in private["personalized_accuracy"]],
                                   [a[-1] for a in reference["personalized_accuracy"]]).mean()
        assert row[9].startswith(f"{personalized:+.4f}")
    assert report_row(report, "no DP")[1] == "∞"
    assert "](plots/privacy_utility.png)" in report and (runs / "smoke" / "plots" / "privacy_utility.png").is_file()
    assert re.search(r"\| 1 \| 1,000,000 \| 2\.5e-07 \| same rate \|", report)


@pytest.mark.slow
def test_running_again_skips_every_run_and_the_report_alone_names_what_is_missing(smoke_study, tmp_path, capsys):
    data, runs, _ = smoke_study
    capsys.readouterr()
    assert main(["privacy-study", "--scale", "smoke", "--data-dir", str(data), "--output", str(runs),
                 "--no-progress"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fedavg-")]
    assert len(lines) == 3 and all(line.endswith("; skipped") for line in lines)

    assert main(["privacy-study", "--scale", "smoke", "--report-only", "--data-dir", str(data),
                 "--output", str(tmp_path)]) == 0
    report = (tmp_path / "smoke" / "report.md").read_text()
    assert all(f"- `fedavg-c3-e1-{name}-s42`" in report for name in ("nodp", "eps8", "eps1"))
    assert "No private run finished" in report and "| no DP |" not in report


def test_a_missing_data_directory_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["privacy-study", "--scale", "smoke", "--data-dir", str(tmp_path / "absent")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--data-dir {tmp_path / 'absent'}: no such directory" in err


@pytest.mark.slow
def test_a_diverged_run_is_reported_with_its_reason_apart_from_the_runs_a_rerun_would_resume(smoke_study, tmp_path):
    data, runs, _ = smoke_study
    for name in ("nodp", "eps1"):
        (run_dir,) = (runs / "smoke").glob(f"fedavg-c3-e1-{name}-s42-*")
        shutil.copytree(run_dir, tmp_path / "smoke" / run_dir.name)
    (diverged_dir,) = (tmp_path / "smoke").glob("fedavg-c3-e1-eps1-s42-*")
    (diverged_dir / "diverged.txt").write_text("diverged at round 2: client/train_loss = 1e+18\n")

    assert main(["privacy-study", "--scale", "smoke", "--report-only", "--data-dir", str(data),
                 "--output", str(tmp_path)]) == 0
    report = (tmp_path / "smoke" / "report.md").read_text()
    resume, diverged = report.split("Not finished yet")[1].split("Diverged (")
    assert "- `fedavg-c3-e1-eps8-s42`" in resume and "eps1" not in resume
    assert "- `fedavg-c3-e1-eps1-s42: diverged at round 2: client/train_loss = 1e+18`" in diverged
    assert "| ε = 1 |" not in report and "| no DP |" in report
