"""``[privacy]`` through the real CLI: the ε line of a run, and one line with exit 2 for each bad setting."""

import pytest

from fedmeta.cli import main

pytest.importorskip("dp_accounting")

# the tiny experiment has 9 training clients: δ must be below 1/9
PRIVATE = ("privacy.noise_multiplier=1.0", "privacy.clip=0.5", "privacy.delta=0.01")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_private_run_prints_epsilon_at_delta(tmp_path, capsys, tiny_settings):
    code, out, _ = run_cli(capsys, "run", "--no-progress", *tiny_settings(tmp_path, *PRIVATE))

    assert code == 0
    (line,) = [line for line in out.splitlines() if line.startswith("privacy ")]
    assert " at delta 0.01 after 3 rounds (rdp, fixed cohorts, noise multiplier 1, clip 0.5)" in line


@pytest.mark.parametrize("overrides, message", [
    (("privacy.noise_multiplier=0",), "privacy.noise_multiplier = 0.0: expected a noise multiplier > 0, finite"),
    (("privacy.noise_multiplier=-0.5",), "privacy.noise_multiplier = -0.5: expected a noise multiplier > 0, finite"),
    (("privacy.clip=0",), "privacy.clip = 0.0: expected a clip norm > 0, finite"),
    (("privacy.clip=-1",), "privacy.clip = -1.0: expected a clip norm > 0, finite"),
    (("privacy.delta=0.2",), "privacy.delta = 0.2: expected below 1/N = 1/9 = 0.111, N the number of training "
                             "clients"),
    (("privacy.noise_multiplier=none", "privacy.target_epsilon=0.001"),
     "privacy.target_epsilon = 0.001: target epsilon 0.001 cannot be reached in 3 rounds at delta 0.01: even noise "
     "multiplier 100 gives epsilon 0.0083"),
    (("privacy.accountant=pld",), "privacy.accountant = 'pld': expected 'rdp' with privacy.sampling = 'fixed'"),
    (("algorithm.name=scaffold",), "algorithm.name = 'scaffold': expected an algorithm DP-FedAvg can make private"),
    (("algorithm.name=local_only",), "algorithm.name = 'local_only': expected an algorithm DP-FedAvg can make private"),
    (("faults.update_norm_factor=3",), "faults.update_norm_factor = 3.0: expected unset with [privacy]"),
])
def test_a_bad_privacy_setting_is_one_line_with_exit_2_and_no_run_directory(tmp_path, capsys, tiny_settings,
                                                                          overrides, message):
    code, out, err = run_cli(capsys, "run", "--no-progress", *tiny_settings(tmp_path, *PRIVATE, *overrides))

    assert code == 2
    assert err.startswith(f"fedmeta: error: {message}") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists() and list(tmp_path.iterdir()) == []


def test_privacy_settings_without_a_noise_multiplier_or_target_are_refused(tmp_path, capsys, tiny_settings):
    code, _, err = run_cli(capsys, "run", *tiny_settings(tmp_path, "privacy.clip=0.5"))

    assert code == 2
    assert err == ("fedmeta: error: privacy.clip = 0.5: expected privacy.noise_multiplier or privacy.target_epsilon "
                   "beside it (without, privacy is off)\n")


def test_a_flower_app_of_a_private_experiment_is_refused(tmp_path, capsys):
    code, _, err = run_cli(capsys, "flower", "app", str(tmp_path / "app"), *[a for o in PRIVATE for a in ("--set", o)])

    assert code == 2
    assert "fedmeta: error: [privacy] on Flower needs flower.secagg = true: the SuperNodes clip the updates" in err
    assert not (tmp_path / "app").exists()
