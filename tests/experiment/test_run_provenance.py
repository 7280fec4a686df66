"""Provenance: every run directory says what ran it and when; every metrics row says when it was written."""

import json
import os
import platform
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch

import fedmeta
import fedmeta.experiment.provenance as provenance_module
from fedmeta.experiment.provenance import source_commit
from fedmeta.experiment.run import resume_experiment, run_experiment

RECORD_KEYS = ["at", "cpu", "cpu_capability", "cpus", "fedmeta", "git_commit", "git_modified", "platform", "python",
               "torch"]


def git(*args, cwd):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.org", *args], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.strip()


def checkout_of_fedmeta():
    """The git checkout fedmeta is imported from, or None (installed from a wheel, or no git)."""
    try:
        root = git("rev-parse", "--show-toplevel", cwd=Path(fedmeta.__file__).resolve().parent)
        git("ls-files", "--error-unmatch", "__init__.py", cwd=Path(fedmeta.__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError):
        return None
    return Path(root)


def interrupted_after_two_rounds(output_dir, tiny_config, monkeypatch, crash_at_round):
    """The run directory of a tiny run stopped by Ctrl-C in round 3, after its checkpoint of 2 rounds."""
    crash_at_round(2, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(tiny_config(output_dir, "checkpoint_every=2"), progress=False)
    monkeypatch.undo()
    (run_dir,) = output_dir.iterdir()
    return run_dir


@pytest.fixture(scope="module")
def timed_run(tmp_path_factory, tiny_config):
    """The tiny run, and the UTC times just before and just after it."""
    before = datetime.now().astimezone()
    result = run_experiment(tiny_config(tmp_path_factory.mktemp("provenance")), progress=False)
    return before, result, datetime.now().astimezone()


def test_a_run_directory_records_versions_cpu_and_start_time(timed_run):
    before, result, after = timed_run

    recorded = json.loads((result.run_dir / "provenance.json").read_text())

    started = recorded["started"]
    assert recorded["resumed"] == [] and sorted(started) == RECORD_KEYS
    assert (started["fedmeta"], started["torch"], started["python"]) == (
        fedmeta.__version__, torch.__version__, platform.python_version())
    assert before <= datetime.fromisoformat(started["at"]) <= after
    assert started["at"].endswith("+00:00")
    # the system, architecture and C library; not the host kernel's release
    assert started["platform"].startswith(f"{platform.system()}-{platform.machine()}")
    assert platform.release() not in started["platform"]


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the model name Linux reports")
def test_the_cpu_is_the_model_name_linux_reports(timed_run):
    _, result, _ = timed_run
    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)

    recorded = json.loads((result.run_dir / "provenance.json").read_text())["started"]

    assert recorded["cpu"] == (names[0].strip() if names else platform.processor() or platform.machine())


def test_the_vector_capability_recorded_is_the_one_torch_runs_with_even_when_forced_lower():
    # a run's speed and its bits depend on it; ATEN_CPU_CAPABILITY=default forces the plainest kernels
    code = "from fedmeta.experiment.provenance import provenance; print(provenance()['cpu_capability'])"
    forced = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": "default"})

    assert forced.stdout.strip() == "DEFAULT"


def test_the_commit_is_the_checkouts_head_when_fedmeta_runs_from_one(timed_run):
    _, result, _ = timed_run
    root = checkout_of_fedmeta()

    recorded = json.loads((result.run_dir / "provenance.json").read_text())["started"]

    if root is None:
        assert (recorded["git_commit"], recorded["git_modified"]) == (None, None)
    else:
        assert recorded["git_commit"] == git("rev-parse", "HEAD", cwd=root)
        assert isinstance(recorded["git_modified"], bool)


def test_every_metrics_row_carries_the_utc_time_it_was_written(timed_run):
    before, result, after = timed_run

    times = [datetime.fromisoformat(row["time/finished_at"]) for row in result.history]

    assert len(times) == result.config.rounds
    assert before <= times[0] and times == sorted(times) and times[-1] <= after


def test_a_resume_adds_its_own_record_and_keeps_the_start(tmp_path, tiny_config, monkeypatch, crash_at_round):
    run_dir = interrupted_after_two_rounds(tmp_path, tiny_config, monkeypatch, crash_at_round)
    started = json.loads((run_dir / "provenance.json").read_text())["started"]

    resume_experiment(run_dir, progress=False)

    recorded = json.loads((run_dir / "provenance.json").read_text())
    assert recorded["started"] == started
    assert len(recorded["resumed"]) == 1 and recorded["resumed"][0]["at"] > started["at"]


def test_a_resume_of_a_run_begun_without_provenance_records_only_itself(tmp_path, tiny_config, monkeypatch,
                                                                        crash_at_round):
    run_dir = interrupted_after_two_rounds(tmp_path, tiny_config, monkeypatch, crash_at_round)
    (run_dir / "provenance.json").unlink()

    resume_experiment(run_dir, progress=False)

    recorded = json.loads((run_dir / "provenance.json").read_text())
    assert recorded["started"] is None and len(recorded["resumed"]) == 1


def test_source_commit_is_the_head_of_the_checkout_that_tracks_the_package(tmp_path, monkeypatch):
    package = tmp_path / "repo" / "src" / "fedmeta"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    git("init", "-q", cwd=tmp_path / "repo")
    git("add", ".", cwd=tmp_path / "repo")
    git("commit", "-q", "-m", "one", cwd=tmp_path / "repo")
    monkeypatch.setattr(provenance_module.fedmeta, "__file__", str(package / "__init__.py"))

    clean = source_commit()
    (package / "__init__.py").write_text("x = 1\n")
    modified = source_commit()

    head = git("rev-parse", "HEAD", cwd=tmp_path / "repo")
    assert clean == (head, False) and modified == (head, True)


def test_source_commit_is_none_outside_a_checkout_or_in_one_that_does_not_track_the_package(tmp_path, monkeypatch):
    # a virtual environment inside some other project's repository: the package is not that repository's
    site_packages = tmp_path / "project" / ".venv" / "site-packages" / "fedmeta"
    site_packages.mkdir(parents=True)
    (site_packages / "__init__.py").write_text("")
    (tmp_path / "project" / "README").write_text("a project")
    git("init", "-q", cwd=tmp_path / "project")
    git("add", "README", cwd=tmp_path / "project")
    git("commit", "-q", "-m", "one", cwd=tmp_path / "project")
    elsewhere = tmp_path / "wheel" / "fedmeta"
    elsewhere.mkdir(parents=True)
    (elsewhere / "__init__.py").write_text("")
    found = []

    for package in (site_packages, elsewhere):
        monkeypatch.setattr(provenance_module.fedmeta, "__file__", str(package / "__init__.py"))
        found.append(source_commit())

    assert found == [(None, None), (None, None)]
