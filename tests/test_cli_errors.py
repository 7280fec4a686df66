"""Bad input through the real CLI: one line ``fedmeta: error: ...`` naming the file or key, exit 2.

Each data case writes a broken dataset directory under ``tmp_path`` and runs
``fedmeta run --set data.kind=... --set data.path=DIR``; the error comes before any
training or run directory.
"""

import json
import re
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fedmeta.cli import main

TRAIN, TEST = "fed_emnist_train.h5", "fed_emnist_test.h5"
ROLES_TRAIN, ROLES_TEST = "shakespeare_train.h5", "shakespeare_test.h5"


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_on(capsys, tmp_path, kind, data_dir, *extra):
    return run_cli(capsys, *extra, "run", "--no-progress", "--set", f"data.kind={kind}",
                   "--set", f"data.path={data_dir}", "--set", f"output_dir={tmp_path / 'runs'}",
                   "--set", "engine.workers=0", "--set", "rounds=1", "--set", "algorithm.cohort_size=1")


def write_emnist(path, clients):
    with h5py.File(path, "w") as handle:
        for cid, (pixels, labels) in clients.items():
            handle.create_dataset(f"examples/{cid}/pixels", data=pixels)
            handle.create_dataset(f"examples/{cid}/label", data=labels)


def writers(n=3, examples=2, labels=(0,), shape=(28, 28)):
    return {f"w{i}": (np.zeros((examples, *shape), np.uint8), np.resize(np.array(labels, np.int32), examples))
            for i in range(n)}


def emnist_pair(folder, train=None, test=None):
    """A valid EMNIST pair in ``folder``, with either file replaced by ``train``/``test`` (clients)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_emnist(folder / TRAIN, writers() if train is None else train)
    write_emnist(folder / TEST, writers() if test is None else test)
    return folder


def h5_with(folder, name, build):
    """``folder/name`` written by ``build(handle)``, beside a valid partner file."""
    emnist_pair(folder)
    with h5py.File(folder / name, "w") as handle:
        build(handle)
    return folder


def client_is_dataset(folder):
    emnist_pair(folder)
    with h5py.File(folder / TRAIN, "a") as handle:
        del handle["examples/w2"]
        handle.create_dataset("examples/w2", data=np.zeros((2, 28, 28), np.uint8))
    return folder


def truncated(folder):
    emnist_pair(folder)
    data = (folder / TRAIN).read_bytes()
    (folder / TRAIN).write_bytes(data[: len(data) // 2])
    return folder


def garbage(folder):
    emnist_pair(folder)
    (folder / TRAIN).write_bytes(np.random.default_rng(0).bytes(4096))
    return folder


def damaged_object_header(folder):
    """The label dataset's object header overwritten: the file opens, the dataset does not."""
    emnist_pair(folder)
    with h5py.File(folder / TRAIN, "r") as handle:
        address = h5py.h5o.get_info(handle["examples/w1/label"].id).addr
    with open(folder / TRAIN, "r+b") as handle:
        handle.seek(address)
        handle.write(b"\xff" * 16)
    return folder


def snippets(folder, train):
    folder.mkdir(parents=True, exist_ok=True)
    for name, clients in ((ROLES_TRAIN, train), (ROLES_TEST, {"A": [b"x"], "B": [b"y"], "C": [b"z"]})):
        with h5py.File(folder / name, "w") as handle:
            for cid, texts in clients.items():
                if texts is None:  # a role without snippets
                    handle.create_dataset(f"examples/{cid}/text", data=[1])
                else:
                    handle.create_dataset(f"examples/{cid}/snippets", data=np.array(texts, dtype=bytes))
    return folder


def leaf(folder, train_text):
    """A LEAF directory whose train shard holds ``train_text`` (bytes) and a valid test shard."""
    (folder / "train").mkdir(parents=True)
    (folder / "test").mkdir()
    (folder / "train" / "a.json").write_bytes(train_text)
    users = {u: {"x": [[0.0] * 784], "y": [1]} for u in ("u1", "u2")}
    (folder / "test" / "a.json").write_text(json.dumps({"users": list(users), "user_data": users}))
    return folder


H5_CASES = {  # kind, how to break the directory, the message from the file's name on
    "truncated h5": (
        "emnist", truncated, r"fed_emnist_train.h5: not a readable h5 file \(Unable to synchronously open file "
        r"\(truncated file: eof = \d+, sblock->base_addr = 0, stored_eof = \d+\)\)"),
    "random bytes named .h5": (
        "emnist", garbage, r"fed_emnist_train.h5: not a readable h5 file \(Unable to synchronously open file "
        r"\(file signature not found\)\)"),
    "damaged object header": (
        "emnist", damaged_object_header,
        r"fed_emnist_train.h5: corrupt h5 file \(Unable to synchronously open object \(.+\)\)"),
    "no /examples group": (
        "emnist", lambda d: h5_with(d, TRAIN, lambda h: h.create_dataset("pixels", data=np.zeros(3))),
        r"fed_emnist_train.h5: no /examples group; expected TFF's layout /examples/<client>/<feature>"),
    "/examples is a dataset": (
        "emnist", lambda d: h5_with(d, TEST, lambda h: h.create_dataset("examples", data=np.zeros(3))),
        r"fed_emnist_test.h5: /examples is a Dataset, not a group; expected TFF's layout "
        r"/examples/<client>/<feature>"),
    "a client that is a dataset": (
        "emnist", client_is_dataset,
        r"fed_emnist_train.h5: client 'w2' is a Dataset, not a group of features "
        r"\(expected /examples/<client>/<feature>\)"),
    "no 'pixels'": (
        "emnist", lambda d: h5_with(d, TRAIN, lambda h: [h.create_dataset(f"examples/w{i}/label", data=[0])
                                                          for i in range(3)]),
        r"fed_emnist_train.h5: client 'w0' has no 'pixels' dataset \(has \['label'\]\)"),
    "no 'label'": (
        "emnist", lambda d: h5_with(d, TEST, lambda h: [h.create_dataset(f"examples/w{i}/pixels",
                                                                          data=np.zeros((1, 28, 28), np.uint8))
                                                         for i in range(3)]),
        r"fed_emnist_test.h5: client 'w0' has no 'label' dataset \(has \['pixels'\]\)"),
    "labels out of range": (
        "emnist", lambda d: emnist_pair(d, train=writers(labels=(3, 62))),
        r"fed_emnist_train.h5: client 'w0': labels must be in 0..61, found 3..62"),
    "every client empty": (
        "emnist", lambda d: emnist_pair(d, train=writers(examples=0)),
        r"fed_emnist_train.h5: 0 of its 3 clients have examples both here and in fed_emnist_test.h5; "
        r"at least 2 are needed \(a training and a held-out client\)"),
    "wrong image shape": (
        "emnist", lambda d: emnist_pair(d, test=writers(shape=(32, 32))),
        r"fed_emnist_test.h5: client 'w0': pixels have shape \(2, 32, 32\), expected \[n, 28, 28\]"),
    "no 'snippets'": (
        "shakespeare", lambda d: snippets(d, {"A": None, "B": [b"x"], "C": [b"y"]}),
        r"shakespeare_train.h5: client 'A' has no 'snippets' dataset \(has \['text'\]\)"),
    "non-UTF-8 snippet": (
        "shakespeare", lambda d: snippets(d, {"A": [b"ok", b"ca\xff"], "B": [b"x"], "C": [b"y"]}),
        r"shakespeare_train.h5: client 'A': snippet 1 is not UTF-8 text \(byte 0xff at offset 2\)"),
}

LEAF_CASES = {
    "empty LEAF json": (b"", r"a.json: empty file \(0 bytes\); expected a LEAF json shard"),
    "LEAF json that is not json": (b'{"users": [', r"a.json: invalid json \(Expecting value: line 1 column 12"),
    "LEAF json with users but no user_data": (b'{"users": ["u1"]}', r"a.json: not a LEAF shard "
                                                                     r"\(no 'user_data' object\)"),
    "LEAF json that is not UTF-8": (b'{"users": ["\xe9"]}', r"a.json: not UTF-8 text \(byte 0xe9 at offset 12\)"),
}


def assert_one_error_line(code, out, err, pattern):
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert re.fullmatch(rf"fedmeta: error: {pattern}\n", err), err


@pytest.mark.parametrize("case", list(H5_CASES))
def test_a_broken_h5_dataset_is_one_line_naming_the_file_and_the_problem(tmp_path, capsys, case):
    kind, build, message = H5_CASES[case]
    data_dir = build(tmp_path / "data")

    code, out, err = run_on(capsys, tmp_path, kind, data_dir)

    assert_one_error_line(code, out, err, f"(?:{re.escape(str(data_dir))}/)?{message}")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("case", list(LEAF_CASES))
def test_a_broken_leaf_shard_is_one_line_naming_the_file_and_the_problem(tmp_path, capsys, case):
    text, message = LEAF_CASES[case]
    data_dir = leaf(tmp_path / "data", text)

    code, out, err = run_on(capsys, tmp_path, "leaf_json", data_dir)

    assert_one_error_line(code, out, err, re.escape(str(data_dir / "train")) + "/" + message + ".*")


def test_a_directory_with_no_h5_files_lists_the_names_it_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()

    code, out, err = run_on(capsys, tmp_path, "emnist", tmp_path / "empty")

    assert_one_error_line(code, out, err, re.escape(
        f"{tmp_path / 'empty'}: no emnist files (fed_emnist_train.h5 + fed_emnist_test.h5 or femnist_train.h5 + "
        "femnist_test.h5); run `fedmeta data download emnist` or set data.path to the directory that holds them"))


def test_a_directory_with_no_leaf_shards_says_what_it_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()

    code, out, err = run_on(capsys, tmp_path, "leaf_json", tmp_path / "empty")

    assert_one_error_line(code, out, err, re.escape(
        f"{tmp_path / 'empty'}: expected train/*.json and test/*.json, or *_train*.json beside *_test*.json; "
        "found 0 train and 0 test files"))


@pytest.mark.parametrize("kind, message", [
    ("emnist", "no such directory; set data.path to the directory that holds the emnist files, "
               "or run `fedmeta data download emnist`"),
    ("shakespeare", "no such directory; set data.path to the directory that holds the shakespeare files, "
                    "or run `fedmeta data download shakespeare`"),
    ("leaf_json", "no such directory of LEAF json files"),
])
def test_a_missing_data_directory_is_named(tmp_path, capsys, kind, message):
    code, out, err = run_on(capsys, tmp_path, kind, tmp_path / "nowhere")

    assert_one_error_line(code, out, err, re.escape(f"{tmp_path / 'nowhere'}: {message}"))


def test_a_cohort_larger_than_the_loaded_training_clients_gives_both_numbers(tmp_path, capsys):
    data_dir = emnist_pair(tmp_path / "data", train=writers(4), test=writers(4))

    code, out, err = run_cli(capsys, "run", "--set", "data.kind=emnist", "--set", f"data.path={data_dir}",
                             "--set", "data.held_out_fraction=0.25", "--set", "algorithm.cohort_size=4")

    assert_one_error_line(code, out, err, r"algorithm.cohort_size = 4: the dataset has only 3 training clients")


@pytest.mark.parametrize("override, message", [
    ("algorithm.client_rl=0.1", "unknown config key 'algorithm.client_rl'; did you mean 'client_lr'?"),
    ("evaluation.fine_tune_epoch=2", "unknown config key 'evaluation.fine_tune_epoch'; "
                                     "did you mean 'fine_tune_epochs'?"),
    ("rounds=ten", "rounds = 'ten': expected an int"),
    ("algorithm.client_lr=fast", "algorithm.client_lr = 'fast': expected a float"),
    ("algorithm.client_lr=-0.1", "algorithm.client_lr = -0.1: expected a positive, finite learning rate"),
    ("algorithm.server_lr=0", "algorithm.server_lr = 0.0: expected a positive, finite learning rate"),
    ("evaluation.fine_tune_lr=-1", "evaluation.fine_tune_lr = -1.0: expected a positive, finite learning rate"),
    ("algorithm.local_epochs=0", "algorithm.local_epochs = 0: expected at least 1"),
    ("algorithm.local_steps=0", "algorithm.local_steps = 0: expected at least 1"),
    ("evaluation.fine_tune_epochs=0", "evaluation.fine_tune_epochs = 0: expected at least 1"),
    ("algorithm.cohort_size=200", "algorithm.cohort_size = 200: expected at most data.num_clients = 100, "
                                  "the number of clients"),
    ("data.held_out_fraction=0", "data.held_out_fraction = 0.0: expected a fraction in (0, 1)"),
    ("data.held_out_fraction=1.5", "data.held_out_fraction = 1.5: expected a fraction in (0, 1)"),
    ("rounds=-3", "rounds = -3: expected at least 1"),
    ("algorithm=fedavg", "algorithm = 'fedavg': expected a table"),
    ("rounds.max=3", "rounds = {'max': 3}: expected an int"),
])
def test_a_bad_override_is_one_line_naming_the_key_and_the_value(capsys, override, message):
    code, out, err = run_cli(capsys, "run", "--set", override)

    assert_one_error_line(code, out, err, re.escape(message))


@pytest.mark.parametrize("text, message", [
    (b"rounds = = 2\n", "invalid TOML: Invalid value (at line 1, column 10)"),
    (b"[algorithm]\nclient_lr = 0.1\n[algorithm]\n", "invalid TOML: Cannot declare ('algorithm',) twice "
                                                      "(at line 3, column 11)"),
    (b"name = 'caf\xe9'\n", "invalid TOML: not UTF-8 text (byte 0xe9 at offset 11)"),
    (b"data = 3\n", "data = 3: expected a table"),
    (b"[algorithm]\nlocal_epochs = 0\n", "algorithm.local_epochs = 0: expected at least 1"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_bytes(text)

    code, out, err = run_cli(capsys, "run", str(path))

    assert_one_error_line(code, out, err, re.escape(f"{path}: {message}"))


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_before_or_after_the_command_shows_the_traceback_above_the_line(tmp_path, capsys, where):
    data_dir = truncated(tmp_path / "data")
    flag = ["--debug"] if where == "before" else []
    argv = [*flag, "run", "--set", "data.kind=emnist", "--set", f"data.path={data_dir}",
            *(["--debug"] if where == "after" else [])]

    code, out, err = run_cli(capsys, *argv)

    lines = err.splitlines()
    assert code == 2
    assert lines[0] == "Traceback (most recent call last):"
    assert lines[-1].startswith(f"fedmeta: error: {data_dir / TRAIN}: not a readable h5 file")
    assert lines[-2] == "ValueError: " + lines[-1].removeprefix("fedmeta: error: ")


@pytest.mark.slow
def test_the_installed_command_exits_2_with_one_line_and_no_traceback(tmp_path):
    data_dir = damaged_object_header(tmp_path / "data")

    result = subprocess.run([sys.executable, "-m", "fedmeta", "run", "--set", "data.kind=emnist",
                             "--set", f"data.path={data_dir}"], capture_output=True, text=True)

    assert result.returncode == 2
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert re.fullmatch(rf"fedmeta: error: {re.escape(str(data_dir / TRAIN))}: corrupt h5 file "
                        r"\(Unable to synchronously open object \(.*\)\)\n", result.stderr)


def test_a_data_path_that_is_a_file_is_not_a_directory(tmp_path, capsys):
    (tmp_path / "fed_emnist_train.h5").write_bytes(b"")

    code, out, err = run_on(capsys, tmp_path, "emnist", tmp_path / "fed_emnist_train.h5")

    assert_one_error_line(code, out, err, re.escape(
        f"{tmp_path / 'fed_emnist_train.h5'}: not a directory; set data.path to the directory that holds the "
        "emnist files, or run `fedmeta data download emnist`"))


def test_more_training_clients_than_the_dataset_has_is_one_line_before_any_run_directory(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--no-progress", "--set", "data.max_train_clients=80",
                           "--set", f"output_dir={tmp_path / 'runs'}", "--set", "engine.workers=0")

    assert code == 2
    assert err == ("fedmeta: error: data.max_train_clients = 80: 80 training clients asked for: synthetic(0.5,0.5) "
                   "has 74 (and 26 held-out, which stay as they are)\n")
    assert not (tmp_path / "runs").exists()
