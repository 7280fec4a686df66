import json

import h5py
import numpy as np
import pytest
import torch

from fedmeta.data.leaf_json import load_leaf_json

SAMPLE_WRITERS = ["f1600_43", "f1865_30", "f1953_17", "f1994_21", "f2065_28"]


def write_shard(path, users):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"users": list(users), "num_samples": [len(u["y"]) for u in users.values()],
                                "user_data": users}))
    return path


def user(*labels, width=1):
    return {"x": [[float(label)] * width for label in labels], "y": list(labels)}


@pytest.fixture(scope="module")
def sample(shared_data):
    return load_leaf_json(shared_data / "femnist" / "leaf_json_sample", num_classes=62, held_out_fraction=0.4)


def test_the_leaf_sample_has_five_writers_with_678_train_and_78_test_examples(sample):
    assert sorted(sample.clients) == SAMPLE_WRITERS
    assert sample.info == {"num_train_examples": 678, "num_test_examples": 78, "unpaired_users": 0,
                           "dropped_clients": 0}
    assert sample.clients["f1600_43"].train.x.shape[1:] == (1, 28, 28)
    assert sample.num_classes == 62


def test_the_leaf_sample_equals_the_same_writers_in_the_h5_files(shared_data, sample):
    h5 = {}
    for split in ("train", "test"):
        with h5py.File(shared_data / "femnist" / f"femnist_{split}.h5", "r") as handle:
            for writer in SAMPLE_WRITERS:
                examples = handle["examples"][writer]
                h5[writer, split] = (examples["pixels"][()], examples["label"][()])

    rounded = {key: np.round(getattr(sample.clients[key[0]], key[1]).x[:, 0].numpy() * 255) for key in h5}

    for (writer, split), (pixels, labels) in h5.items():
        assert np.array_equal(rounded[writer, split], pixels)
        assert np.array_equal(getattr(sample.clients[writer], split).y.numpy(), labels)


def test_explicit_train_and_test_files_load_like_the_directory(shared_data, sample):
    folder = shared_data / "femnist" / "leaf_json_sample"
    train_file, = folder.glob("*_train_*.json")
    test_file, = folder.glob("*_test_*.json")

    explicit = load_leaf_json([train_file], test_file, num_classes=62, held_out_fraction=0.4)

    assert explicit.held_out_ids == sample.held_out_ids
    assert torch.equal(explicit.clients["f1994_21"].test.x, sample.clients["f1994_21"].test.x)


def test_users_are_merged_across_shards_in_train_and_test_directories(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {"u1": {"x": [[0.0, 1.0]], "y": [1]}})
    write_shard(tmp_path / "train" / "b.json", {"u1": {"x": [[2.0, 3.0]], "y": [0]}, "u2": user(2, width=2)})
    write_shard(tmp_path / "test" / "a.json", {"u1": user(1, width=2), "u2": user(0, width=2)})

    dataset = load_leaf_json(tmp_path, image_shape=None, held_out_fraction=0.5)

    assert dataset.clients["u1"].train.x.tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert dataset.clients["u1"].train.y.tolist() == [1, 0]
    assert dataset.num_classes == 3  # the largest label plus one


def test_users_in_only_one_split_are_dropped_and_counted(tmp_path):
    train = write_shard(tmp_path / "tr.json", {"u1": user(0), "u2": user(1), "only_train": user(1)})
    test = write_shard(tmp_path / "te.json", {"u1": user(1), "u2": user(0), "only_test": user(0)})

    dataset = load_leaf_json(train, test, image_shape=None, held_out_fraction=0.5)

    assert sorted(dataset.clients) == ["u1", "u2"]
    assert dataset.info["unpaired_users"] == 2


def test_mismatched_x_and_y_name_the_shard_and_user(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {"u1": {"x": [[0.0], [1.0]], "y": [1]}})
    write_shard(tmp_path / "test" / "a.json", {"u1": user(1)})

    with pytest.raises(ValueError, match=r"a.json: user 'u1' has 1 labels but 2 inputs"):
        load_leaf_json(tmp_path, image_shape=None)


def test_inputs_that_do_not_fit_the_image_shape_name_the_shard_and_user(tmp_path):
    train = write_shard(tmp_path / "tr.json", {"u1": user(0, width=783)})

    with pytest.raises(ValueError, match=r"tr.json: user 'u1': inputs of shape \(783,\) cannot be reshaped to "
                                         r"\(1, 28, 28\)"):
        load_leaf_json(train, train)


def test_ragged_inputs_name_the_shard_and_user(tmp_path):
    train = write_shard(tmp_path / "tr.json", {"u1": {"x": [[0.0], [1.0, 2.0]], "y": [0, 1]}})

    with pytest.raises(ValueError, match=r"tr.json: user 'u1': 'x' must be equal-length lists of numbers"):
        load_leaf_json(train, train, image_shape=None)


def test_users_with_inputs_of_different_widths_are_refused(tmp_path):
    train = write_shard(tmp_path / "tr.json", {"u1": user(0, width=3), "u2": user(0, width=4)})

    with pytest.raises(ValueError, match=r"tr.json: user 'u2': inputs of shape \(4,\), but .*'u1' has \(3,\)"):
        load_leaf_json(train, train, image_shape=None)


def test_labels_beyond_num_classes_name_the_shard_and_user(tmp_path):
    train = write_shard(tmp_path / "tr.json", {"u1": user(0, 5), "u2": user(0)})

    with pytest.raises(ValueError, match=r"tr.json: user 'u1': labels must be in 0..2, found 0..5"):
        load_leaf_json(train, train, image_shape=None, num_classes=3)


def test_invalid_json_names_the_file(tmp_path):
    broken = tmp_path / "train" / "broken.json"
    broken.parent.mkdir()
    broken.write_text("{")
    write_shard(tmp_path / "test" / "a.json", {"u1": user(1)})

    with pytest.raises(ValueError, match=r"broken.json: invalid json"):
        load_leaf_json(tmp_path, image_shape=None)


def test_json_without_user_data_is_not_a_leaf_shard(tmp_path):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"users": ["u1"]}))

    with pytest.raises(ValueError, match=r"other.json: not a LEAF shard \(no 'user_data' object\)"):
        load_leaf_json(other, other)


def test_a_directory_without_leaf_shards_says_what_it_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected train/\*.json and test/\*.json, or \*_train\*.json "
                                                r"beside \*_test\*.json; found 0 train and 0 test files"):
        load_leaf_json(tmp_path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope.json: no such LEAF json file or directory"):
        load_leaf_json(tmp_path / "nope.json", tmp_path / "nope.json")


def test_flat_inputs_keep_their_width_without_an_image_shape(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {u: {"x": np.ones((2, 60)).tolist(), "y": [0, 1]} for u in "ab"})
    write_shard(tmp_path / "test" / "a.json", {u: {"x": np.ones((1, 60)).tolist(), "y": [1]} for u in "ab"})

    dataset = load_leaf_json(tmp_path, image_shape=None, held_out_fraction=0.5)

    assert dataset.clients["a"].train.x.shape == (2, 60)
    assert dataset.clients["a"].train.x.dtype == torch.float32 and dataset.clients["a"].train.y.dtype == torch.int64


def test_a_single_user_with_both_splits_names_the_shards(tmp_path):
    # found by fuzzing: the error came from split_clients and named no file
    train = write_shard(tmp_path / "tr.json", {"u1": user(0), "u2": user(1)})
    test = write_shard(tmp_path / "te.json", {"u2": user(0)})

    with pytest.raises(ValueError, match=r"tr.json: 1 users have both train and test examples \(2 users in train, "
                                         r"1 in te.json\); at least 2 are needed"):
        load_leaf_json(train, test, image_shape=None)


@pytest.mark.parametrize("record, message", [
    ({"x": [[1.0]], "y": "a"}, r"tr.json: user 'u1': 'y' must be a list of integer labels, got a"),
    ({"x": 5, "y": [1]}, r"tr.json: user 'u1' has 1 labels but no list of inputs"),
    ({"x": [1.0], "y": [1]}, r"tr.json: user 'u1': 'x' must be a list of inputs, each a non-empty list of numbers"),
    ({"x": [[]], "y": [1]}, r"tr.json: user 'u1': 'x' must be a list of inputs, each a non-empty list of numbers"),
    ({"x": [[float("nan")]], "y": [1]}, r"tr.json: user 'u1': 'x' holds non-finite values"),
    ({"x": [[1e39]], "y": [1]}, r"tr.json: user 'u1': 'x' holds non-finite values \(NaN or infinity, or beyond "
                                r"float32\)"),
])
def test_records_that_are_not_lists_of_examples_name_the_shard_and_user(tmp_path, record, message):
    # the first two raised TypeError (len() of a 0-d array); NaN inputs used to load
    train = write_shard(tmp_path / "tr.json", {"u1": record, "u2": user(0)})

    with pytest.raises(ValueError, match=message):
        load_leaf_json(train, train, image_shape=None)


@pytest.mark.parametrize("text, message", [
    (b"", r"empty.json: empty file \(0 bytes\); expected a LEAF json shard"),
    (b"[" * 100_000 + b"]" * 100_000, r"empty.json: invalid json \(nested too deeply\)"),  # was RecursionError
    (b'{"users": "\xff"}', r"empty.json: not UTF-8 text \(byte 0xff at offset 11\)"),
])
def test_shards_that_are_not_json_text_name_the_file(tmp_path, text, message):
    (tmp_path / "empty.json").write_bytes(text)

    with pytest.raises(ValueError, match=message):
        load_leaf_json(tmp_path / "empty.json", tmp_path / "empty.json")


def test_a_shard_with_a_utf8_byte_order_mark_loads(tmp_path):
    path = write_shard(tmp_path / "bom.json", {"u1": user(0), "u2": user(1)})
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())

    dataset = load_leaf_json(path, path, image_shape=None, held_out_fraction=0.5)

    assert sorted(dataset.clients) == ["u1", "u2"]


def test_a_directory_named_like_a_shard_is_not_read(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {"u1": user(0), "u2": user(1)})
    write_shard(tmp_path / "test" / "a.json", {"u1": user(1), "u2": user(0)})
    (tmp_path / "train" / "folder.json").mkdir()

    dataset = load_leaf_json(tmp_path, image_shape=None, held_out_fraction=0.5)

    assert sorted(dataset.clients) == ["u1", "u2"]
