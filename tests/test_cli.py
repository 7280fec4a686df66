import contextlib
import io
import re
import subprocess
import sys
from typing import NamedTuple

import pytest

from fedmeta.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def printed(out, label):
    return re.search(rf"^{label}\s+(\S+)", out, re.MULTILINE).group(1)


class FinishedRun(NamedTuple):
    output_dir: str
    out: str


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_settings) -> FinishedRun:
    """A two-round tiny run by ``fedmeta run``, with what it printed; tests only read it."""
    output_dir = str(tmp_path_factory.mktemp("finished"))
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(["run", *tiny_settings(output_dir, "rounds=2"), "--no-progress"])
    assert code == 0
    return FinishedRun(output_dir, out.getvalue())


def test_run_prints_initial_and_personalized_accuracy_and_the_run_directory(finished_run):
    out = finished_run.out
    run_dir = printed(out, "run directory")

    assert run_dir.startswith(finished_run.output_dir)
    assert 0 <= float(printed(out, "initial accuracy")) <= 1
    assert 0 <= float(printed(out, "personalized accuracy")) <= 1
    assert "clients evaluated       3" in out


def test_eval_of_the_checkpoint_prints_the_runs_accuracies(finished_run, capsys):
    run_dir = printed(finished_run.out, "run directory")

    code, out, _ = run_cli(capsys, "eval", f"{run_dir}/checkpoint.pt")

    assert code == 0
    assert printed(out, "initial accuracy") == printed(finished_run.out, "initial accuracy")
    assert printed(out, "personalized accuracy") == printed(finished_run.out, "personalized accuracy")


def test_plot_writes_four_png_files(finished_run, capsys):
    run_dir = printed(finished_run.out, "run directory")

    code, out, _ = run_cli(capsys, "plot", run_dir)

    paths = out.split()
    assert code == 0
    assert [p.rsplit("/", 1)[-1] for p in paths] == [
        "accuracy_over_rounds.png", "initial_vs_personalized.png", "client_distribution.png",
        "gain_by_client_size.png"]
    for path in paths:
        with open(path, "rb") as png:
            assert png.read(8) == b"\x89PNG\r\n\x1a\n"


def test_bad_override_exits_2_with_one_error_line(capsys):
    code, out, err = run_cli(capsys, "run", "--set", "algorithm.client_rl=0.1")

    assert code == 2
    assert out == ""
    assert err == "fedmeta: error: unknown config key 'algorithm.client_rl'; did you mean 'client_lr'?\n"


def test_plot_of_a_directory_that_is_not_a_run_exits_2(tmp_path, capsys):
    code, _, err = run_cli(capsys, "plot", str(tmp_path))

    assert code == 2
    assert "no metrics.jsonl here" in err


def test_missing_dataset_files_exit_2_and_say_how_to_get_them(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "femnist", "--set", f"data.path={tmp_path}")

    assert code == 2
    assert err.startswith("fedmeta: error: ")
    assert "fedmeta data download emnist" in err


@pytest.mark.slow
def test_module_entry_point_reports_errors_with_exit_status_2():
    result = subprocess.run([sys.executable, "-m", "fedmeta", "run", "--set", "rounds=0"],
                            capture_output=True, text=True)

    assert result.returncode == 2
    assert result.stderr.strip() == "fedmeta: error: rounds = 0: expected at least 1"


def test_decompose_shows_the_terms_adding_up_to_the_clients_fedavg_update(finished_run, capsys):
    run_dir = printed(finished_run.out, "run directory")

    code, out, _ = run_cli(capsys, "decompose", f"{run_dir}/checkpoint.pt", "--set", "algorithm.local_epochs=2")

    steps = int(re.search(r"(\d+) local steps", out).group(1))
    terms = re.findall(r"^\s+\|(fedsgd|fomaml\(\d+\)|fedavg)\|\s+(\S+)", out, re.MULTILINE)
    gap = float(re.search(r"largest difference from the client's FedAvg update (\S+)", out).group(1))
    assert code == 0
    assert [name for name, _ in terms] == ["fedsgd", *[f"fomaml({j})" for j in range(1, steps)], "fedavg"]
    assert gap < 1e-4


@pytest.mark.parametrize("content, message", [
    (b'{"round": 0}\n{"round": 1, "client/tr', "line 2 is not a JSON record (Unterminated string"),
    (b'{"round": 0}\n\xff\xfe\n', "not UTF-8 text (invalid start byte at byte 13)"),
])
def test_plot_of_a_damaged_metrics_file_names_the_file_and_the_line(tmp_path, capsys, content, message):
    (tmp_path / "metrics.jsonl").write_bytes(content)

    code, _, err = run_cli(capsys, "plot", str(tmp_path))

    assert code == 2
    assert err.startswith(f"fedmeta: error: {tmp_path / 'metrics.jsonl'}: {message}")


def test_a_run_whose_last_round_got_no_update_back_still_reports_and_plots(tmp_path, capsys, tiny_settings):
    # with dropout 0.999 the seeded draws leave both rounds without an update: they are skipped
    code, out, err = run_cli(capsys, "run", *tiny_settings(tmp_path, "rounds=2", "faults.dropout=0.999"),
                             "--no-progress")

    run_dir = printed(out, "run directory")
    assert code == 0, err
    assert "final train loss        none came back" in out
    assert run_cli(capsys, "plot", run_dir)[0] == 0


def test_an_output_dir_that_is_a_file_is_one_line_naming_it(tmp_path, capsys, tiny_settings):
    blocker = tmp_path / "runs"
    blocker.write_text("not a directory")

    code, _, err = run_cli(capsys, "run", *tiny_settings(blocker), "--no-progress")

    assert code == 2
    assert err.startswith(f"fedmeta: error: output_dir = '{blocker}': cannot create {blocker}/default-")
    assert err.rstrip().endswith("(Not a directory)") and err.count("\n") == 1


def test_decompose_refuses_a_client_update_that_is_not_plain_local_steps(finished_run, capsys):
    checkpoint = f"{printed(finished_run.out, 'run directory')}/checkpoint.pt"

    code, _, err = run_cli(capsys, "decompose", checkpoint, "--set", "algorithm.name=maml")

    assert code == 2
    assert err == (f"fedmeta: error: {checkpoint}: the decomposition holds for clients that take plain local steps "
                   "(fedsgd, fedavg, reptile, two_stage, centralized), not for maml(K=1)\n")
