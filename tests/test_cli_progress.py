"""The progress bar is drawn on a terminal only: a pipe or a log file gets no redrawn frames."""

import subprocess
import sys

import pytest

from fedmeta.cli import main


def test_no_progress_frames_when_the_output_is_captured(tmp_path, capsys, tiny_settings):
    code = main(["run", *tiny_settings(tmp_path, "rounds=2")])

    out, err = capsys.readouterr()
    assert code == 0
    assert "\r" not in out + err and "round/s" not in err


def test_the_bar_is_drawn_when_both_outputs_are_terminals(tmp_path, capsys, monkeypatch, tiny_settings):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    code = main(["run", *tiny_settings(tmp_path, "rounds=2")])

    assert code == 0
    assert "\r" in capsys.readouterr().err


def test_no_progress_hides_the_bar_on_a_terminal_too(tmp_path, capsys, monkeypatch, tiny_settings):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)

    code = main(["run", *tiny_settings(tmp_path, "rounds=2"), "--no-progress"])

    assert code == 0
    assert "\r" not in capsys.readouterr().err


@pytest.mark.slow  # a real process
def test_a_run_piped_into_another_program_writes_no_carriage_returns(tmp_path, tiny_settings):
    result = subprocess.run([sys.executable, "-m", "fedmeta", "run", *tiny_settings(tmp_path, "rounds=2")],
                            capture_output=True, timeout=300)

    assert result.returncode == 0, result.stderr
    assert b"\r" not in result.stdout + result.stderr
