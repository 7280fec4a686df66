"""Failures of the disk, the filesystem and crafted files, through the real CLI: one line, exit 2.

A full disk and a read-only run directory are real: a small tmpfs, or a read-only bind
mount, in a private mount namespace (``unshare``); those tests are skipped where the
system permits no such namespace.
"""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile

import h5py
import numpy as np
import pytest
import torch

from fedmeta.cli import main
from fedmeta.experiment.run import run_experiment

# the shared tiny experiment, over 4 rounds and checkpointed after each
RELIABILITY = ("rounds=4", "evaluation.fine_tune_epochs=1", "checkpoint_every=1")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def settings(*overrides):
    return [item for override in overrides for item in ("--set", override)]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error_line(code, out, err, message):
    assert (code, out) == (2, "")
    assert err == f"fedmeta: error: {message}\n"


def fedmeta(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "fedmeta", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_config):
    """A finished tiny run's directory; tests only read it."""
    return run_experiment(tiny_config(tmp_path_factory.mktemp('finished'), *RELIABILITY), progress=False).run_dir


@pytest.fixture
def crashed(tmp_path, monkeypatch, tiny_config, crash_at_round):
    """A run directory whose run crashed in round 2, after checkpointing 2 rounds."""
    crash_at_round(2)
    with pytest.raises(RuntimeError):
        run_experiment(tiny_config(tmp_path / "runs", *RELIABILITY), progress=False)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "runs").iterdir()
    return run_dir


# --- a full disk and a read-only directory, for real -------------------------------------------------------

def namespace_permitted():
    probe = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=4k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


def needs_namespace(test):
    """Real mounts in real processes: the slow tier, skipped where no private mount namespace is allowed."""
    permitted = shutil.which("unshare") is not None and namespace_permitted()
    return pytest.mark.slow(pytest.mark.skipif(not permitted, reason="no private mount namespace here (unshare)")(test))


def in_namespace(tmp_path, script):
    """Runs ``script`` (sh) in a private mount namespace; returns each ``fedmeta`` step's (code, stdout, stderr)."""
    result = subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], env=ENV,
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    steps = sorted(p.stem for p in tmp_path.glob("step*.code"))
    return [(int((tmp_path / f"{s}.code").read_text()), (tmp_path / f"{s}.out").read_text(),
             (tmp_path / f"{s}.err").read_text()) for s in steps]


def step(name, *args):
    command = shlex.join([sys.executable, "-m", "fedmeta", *args])
    return f"{command} > {name}.out 2> {name}.err; echo $? > {name}.code"


@needs_namespace
def test_a_full_disk_before_the_config_is_written_leaves_no_run_directory(tmp_path, tiny_settings):
    disk = tmp_path / "disk"
    disk.mkdir()

    (code, out, err), = in_namespace(tmp_path, "\n".join([
        f"mount -t tmpfs -o size=64k tmpfs {disk}",
        f"head -c 1M /dev/zero > {disk}/filler 2>/dev/null",
        step("step1", "run", "--no-progress", *tiny_settings(f"{disk}/runs", *RELIABILITY)),
        f"ls -A {disk}/runs > {tmp_path}/left",
    ]))

    assert (code, out) == (2, "")
    assert re.fullmatch(rf"fedmeta: error: {re.escape(str(disk))}/runs/(default-[\d-]+)/"
                        r"(\.lock|config\.toml|provenance\.json): "
                        r"cannot write \(No space left on device\); "
                        rf"{re.escape(str(disk))}/runs/\1 held nothing to resume and was removed\n", err)
    assert (tmp_path / "left").read_text() == ""


@needs_namespace
def test_a_disk_that_fills_during_the_run_stops_it_in_one_line_and_the_run_resumes_once_freed(tmp_path,
                                                                                               tiny_settings):
    disk = tmp_path / "disk"
    disk.mkdir()

    # 64 KiB of tmpfs with 28 KiB free: config, lock, metrics and one 11 KiB checkpoint fit, the next one does not
    steps = in_namespace(tmp_path, "\n".join([
        f"mount -t tmpfs -o size=64k tmpfs {disk}",
        f"head -c 36k /dev/zero > {disk}/filler",
        step("step1", "run", "--no-progress", *tiny_settings(f"{disk}/runs", *RELIABILITY)),
        f"rm {disk}/filler",
        f'{step("step2", "run", "--no-progress", "--resume", "RUN_DIR")}'.replace("RUN_DIR", f"$(ls -d {disk}/runs/*)"),
        f"cp -r {disk}/runs {tmp_path}/kept",
    ]))

    (code, out, err), (resumed_code, resumed_out, resumed_err) = steps
    (run_dir,) = (tmp_path / "kept").iterdir()
    original = f"{disk}/runs/{run_dir.name}"
    assert code == 2
    found = re.fullmatch(rf"fedmeta: error: {re.escape(original)}/"
                         r"(metrics\.jsonl|checkpoint\.pt|evaluations?\.jsonl?): "
                         r"cannot write \(No space left on device\); stopped, "
                         rf"{re.escape(original)}/checkpoint\.pt keeps the run after (\d) rounds: free space or fix "
                         rf"the directory, then continue with `fedmeta run --resume {re.escape(original)}`\n", err)
    assert found and 1 <= int(found[2]) < 4, err
    assert resumed_code == 0, resumed_err
    rounds = [json.loads(line)["round"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3, 4]
    evaluated = [json.loads(line)["round"] for line in (run_dir / "evaluations.jsonl").read_text().splitlines()]
    assert evaluated == [2, 4]  # every second round, each once
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint.pt", "config.toml", "evaluation.json",
                                                          "evaluations.jsonl", "metrics.jsonl", "provenance.json"]


@needs_namespace
def test_resuming_a_read_only_run_directory_is_one_line(tmp_path, crashed):
    (code, out, err), = in_namespace(tmp_path, "\n".join([
        f"mount --bind {crashed} {crashed}",
        f"mount -o remount,bind,ro {crashed}",
        step("step1", "run", "--no-progress", "--resume", str(crashed)),
    ]))

    assert (code, out) == (2, "")
    assert err == (f"fedmeta: error: {crashed}/.lock: cannot write (Read-only file system); a resumed run writes "
                   "to its run directory\n")


# --- paths and names --------------------------------------------------------------------------------------

def test_a_path_component_over_255_bytes_is_one_line(tmp_path, capsys, tiny_settings):
    long = tmp_path / ("x" * 300)

    data = run_cli(capsys, "run", *settings("data.kind=emnist", f"data.path={long}"))
    output = run_cli(capsys, "run", "--no-progress", *tiny_settings(long, *RELIABILITY))

    assert_one_error_line(*data, f"{long}: cannot be read (File name too long); set data.path to the directory "
                                 "that holds the emnist files, or run `fedmeta data download emnist`")
    assert output[:2] == (2, "")
    assert re.fullmatch(rf"fedmeta: error: output_dir = '{re.escape(str(long))}': cannot create "
                        rf"{re.escape(str(long))}/default-[\d-]+ \(File name too long\)\n", output[2])


@pytest.mark.parametrize("override, shown", [
    ('name=".."', "'..'"),
    ('name=".hidden"', "'.hidden'"),
    ('name="a\\u0000b"', "'a\\x00b'"),
    (f'name="{"n" * 10_000_000}"', repr("n" * 60 + "...")),
])
def test_a_name_that_cannot_name_a_visible_run_directory_is_refused_naming_the_key(capsys, override, shown):
    code, out, err = run_cli(capsys, "run", "--set", override)

    assert_one_error_line(code, out, err, f"name = {shown}: expected a name of 1 to 200 bytes, without '/' or "
                                          "control characters, not starting with '.' or '-' (it names the run "
                                          "directory)")


def test_an_empty_data_path_is_refused_rather_than_meaning_the_working_directory(capsys):
    code, out, err = run_cli(capsys, "run", "--set", "data.kind=emnist", "--set", "data.path=")

    assert_one_error_line(code, out, err, "data.path = '': expected a path, non-empty and without NUL bytes")


def write_emnist(path, test_examples=(2, 2, 2)):
    with h5py.File(path, "w") as handle:
        for i, n in enumerate(test_examples):
            handle.create_dataset(f"examples/w{i}/pixels", data=np.zeros((n, 28, 28), np.uint8))
            handle.create_dataset(f"examples/w{i}/label", data=np.zeros(n, np.int32))


def test_an_h5_file_that_is_a_directory_is_named(tmp_path, capsys):
    (tmp_path / "femnist_train.h5").mkdir()
    write_emnist(tmp_path / "femnist_test.h5")

    code, out, err = run_cli(capsys, "run", *settings("data.kind=emnist", f"data.path={tmp_path}"))

    assert_one_error_line(code, out, err, f"{tmp_path / 'femnist_train.h5'}: a directory, not a file; expected the "
                                          "emnist h5 file")


def test_an_h5_file_that_is_a_symlink_loop_is_named(tmp_path, capsys):
    (tmp_path / "fed_emnist_train.h5").symlink_to("loop")
    (tmp_path / "loop").symlink_to("fed_emnist_train.h5")
    write_emnist(tmp_path / "fed_emnist_test.h5")

    code, out, err = run_cli(capsys, "run", *settings("data.kind=emnist", f"data.path={tmp_path}"))

    assert_one_error_line(code, out, err, f"{tmp_path / 'fed_emnist_train.h5'}: cannot be read (Too many levels of "
                                          "symbolic links); expected the emnist h5 file")


def test_a_client_dropped_for_having_no_test_examples_is_mentioned(tmp_path, capsys):
    write_emnist(tmp_path / "fed_emnist_train.h5")
    write_emnist(tmp_path / "fed_emnist_test.h5", test_examples=(2, 2, 0))

    code, out, err = run_cli(capsys, "run", "--no-progress", *settings(
        "data.kind=emnist", f"data.path={tmp_path}", f"output_dir={tmp_path / 'runs'}", "rounds=1",
        "algorithm.cohort_size=1", "engine.workers=0", "evaluation.fine_tune_epochs=1"))

    assert code == 0, err
    assert "data                    emnist: 1 training, 1 held-out clients (1 dropped: no training or no test " \
           "examples)\n" in out


# --- crafted checkpoints ----------------------------------------------------------------------------------

def crafted(finished, tmp_path, change):
    payload = torch.load(finished / "checkpoint.pt", weights_only=True)
    change(payload)
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    return path


def set_in(keys, value):
    def change(payload):
        table = payload
        for key in keys[:-1]:
            table = table[key]
        table[keys[-1]] = value
    return change


CRAFTED = {
    "wrong shape": (set_in(["weights", "linear.weight"], torch.zeros(3, 3)),
                    "does not fit its config (weights['linear.weight'] is a torch.float32 tensor of shape (3, 3), "
                    "expected torch.float32 of shape (10, 60))"),
    "missing weight": (lambda p: p["weights"].pop("linear.bias"),
                       "does not fit its config (weights holds ['linear.weight'], expected ['linear.bias', "
                       "'linear.weight'])"),
    "missing key": (lambda p: p.pop("rounds_done"), "not a fedmeta checkpoint (missing rounds_done)"),
    "bad rng state": (set_in(["torch_rng_state"], torch.full((5056,), 255, dtype=torch.uint8)),
                      "torch_rng_state is not a valid generator state (Invalid mt19937 state)"),
    "rng of the wrong shape": (set_in(["torch_rng_state"], torch.zeros(3, dtype=torch.uint8)),
                               "not a fedmeta checkpoint (torch_rng_state is a torch.uint8 tensor of shape (3,), "
                               "expected torch's torch.uint8 generator state of shape (5056,))"),
    "string metrics_offset": (set_in(["metrics_offset"], "12"),
                              "not a fedmeta checkpoint (metrics_offset = '12', expected a size in bytes >= 1)"),
    "negative metrics_offset": (set_in(["metrics_offset"], -5),
                                "not a fedmeta checkpoint (metrics_offset = -5, expected a size in bytes >= 1)"),
    "aggregator state of the wrong structure": (
        set_in(["server_state", "aggregator"], {"x": 1}),
        "does not fit its config (server_state aggregator is {'x': 1}, expected 0 items)"),
    "server state of the wrong structure": (
        set_in(["server_state", "server"], {"velocity": [1, 2]}),
        "does not fit its config (server_state server holds ['velocity'], expected [])"),
    "all-NaN weights": (lambda p: p["weights"].update({k: torch.full_like(w, float("nan"))
                                                       for k, w in p["weights"].items()}),
                        "weight 'linear.weight' has 600 non-finite values of 600; a model with NaN or inf weights "
                        "cannot be evaluated or trained"),
}


@pytest.mark.parametrize("case", CRAFTED)
def test_eval_refuses_a_crafted_checkpoint_in_one_line_before_using_it(finished, tmp_path, capsys, case):
    change, message = CRAFTED[case]
    path = crafted(finished, tmp_path, change)

    code, out, err = run_cli(capsys, "eval", str(path))

    assert_one_error_line(code, out, err, f"{path}: {message}")


def test_resume_refuses_a_server_state_of_the_wrong_structure(crashed, capsys):
    payload = torch.load(crashed / "checkpoint.pt", weights_only=True)
    payload["server_state"]["server"] = {"velocity": {"linear.weight": torch.zeros(10, 60)}}
    torch.save(payload, crashed / "checkpoint.pt")
    before = (crashed / "metrics.jsonl").read_bytes()

    code, out, err = run_cli(capsys, "run", "--resume", str(crashed), "--no-progress")

    assert_one_error_line(code, out, err, f"{crashed / 'checkpoint.pt'}: does not fit its config (server_state "
                                          "server holds ['velocity'], expected [])")
    assert (crashed / "metrics.jsonl").read_bytes() == before


# --- outputs, pipes, interrupts, downloads ----------------------------------------------------------------

def test_eval_refuses_an_output_that_is_a_directory_before_evaluating(finished, tmp_path, capsys):
    code, out, err = run_cli(capsys, "eval", str(finished / "checkpoint.pt"), "--output", str(tmp_path))

    assert_one_error_line(code, out, err, f"--output {tmp_path}: a directory; give the path of a file to write")


def test_flower_app_on_an_existing_file_is_one_line(tmp_path, capsys):
    (tmp_path / "app").write_text("")

    code, out, err = run_cli(capsys, "flower", "app", str(tmp_path / "app"))

    assert_one_error_line(code, out, err, f"{tmp_path / 'app'}: a file, not a directory; choose a new directory "
                                          "for the Flower App")


def test_a_cache_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "cache").write_text("")

    code, out, err = run_cli(capsys, "data", "download", "emnist", "--cache-dir", str(tmp_path / "cache"))

    assert_one_error_line(code, out, err, f"cache directory {tmp_path / 'cache'}: cannot create "
                                          f"{tmp_path / 'cache' / 'emnist'} (Not a directory)")


def test_a_failed_download_leaves_no_archive_and_a_new_url_replaces_it(tmp_path, capsys):
    good = tmp_path / "good.tar.bz2"
    for name in ("fed_emnist_train.h5", "fed_emnist_test.h5"):
        (tmp_path / name).write_bytes(b"h5 stand-in")
    with tarfile.open(good, "w:bz2") as tar:
        for name in ("fed_emnist_train.h5", "fed_emnist_test.h5"):
            tar.add(tmp_path / name, arcname=f"fed_emnist/{name}")
    cache = tmp_path / "cache"

    bad = run_cli(capsys, "data", "download", "emnist", "--cache-dir", str(cache), "--url",
                  f"file://{tmp_path / 'fed_emnist_train.h5'}")
    left = sorted(p.name for p in (cache / "emnist").iterdir())
    fixed = run_cli(capsys, "data", "download", "emnist", "--cache-dir", str(cache), "--url", f"file://{good}")

    assert bad[0] == 2 and "not a readable tar.bz2 archive" in bad[2]
    assert left == []
    assert fixed[:2] == (0, f"{cache / 'emnist' / 'fed_emnist_train.h5'}\n{cache / 'emnist' / 'fed_emnist_test.h5'}\n")


@pytest.mark.slow  # a real process
def test_a_run_piped_into_head_ends_in_one_line_after_finishing(tmp_path, tiny_settings):
    process = fedmeta("run", "--no-progress", *tiny_settings(tmp_path, *RELIABILITY))

    first = process.stdout.readline()
    process.stdout.close()  # what `| head -1` does after its line
    err = process.stderr.read()
    process.wait(timeout=120)

    (run_dir,) = tmp_path.iterdir()
    assert first == f"run directory           {run_dir}\n"
    assert process.returncode == 2
    assert err == "fedmeta: error: standard output was closed before all output was written (Broken pipe)\n"
    assert (run_dir / "evaluation.json").is_file()


@pytest.mark.slow  # a real process
def test_ctrl_c_names_the_run_directory_to_resume(tmp_path, tiny_settings):
    # as from a terminal: a shell without job control starts background jobs with SIGINT ignored, which the
    # child would inherit, and Python then raises no KeyboardInterrupt at all
    process = fedmeta("run", "--no-progress", *tiny_settings(tmp_path, *RELIABILITY, "rounds=2000"),
                      preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    run_dir = tmp_path / re.fullmatch(r"run directory +\S+/(\S+)\n", process.stdout.readline())[1]
    while not (run_dir / "checkpoint.pt").exists():
        assert process.poll() is None
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)

    assert process.returncode == 130
    assert err == f"fedmeta: interrupted; continue with `fedmeta run --resume {run_dir}` from the last checkpoint\n"
