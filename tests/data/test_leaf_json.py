import json

import numpy as np
import pytest
import torch

from fedmeta.data.leaf_json import load_leaf_json
from fedmeta.data.tff_h5 import load_emnist_h5

SAMPLE_WRITERS = ["f1600_43", "f1865_30", "f1953_17", "f1994_21", "f2065_28"]


def write_shard(path, users):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"users": list(users), "num_samples": [len(u["y"]) for u in users.values()],
                                "user_data": users}))


def test_leaf_sample_has_five_writers_with_678_train_and_78_test_examples(shared_data):
    dataset = load_leaf_json(shared_data / "femnist" / "leaf_json_sample", num_classes=62, held_out_fraction=0.4)

    assert sorted(dataset.clients) == SAMPLE_WRITERS
    assert dataset.info == {"num_train_examples": 678, "num_test_examples": 78, "dropped_clients": 0}
    assert dataset.clients["f1600_43"].train.x.shape[1:] == (1, 28, 28)


def test_leaf_sample_equals_the_same_writers_in_the_h5_files(shared_data):
    leaf = load_leaf_json(shared_data / "femnist" / "leaf_json_sample", num_classes=62, held_out_fraction=0.4)
    h5 = load_emnist_h5(shared_data / "femnist" / "femnist_train.h5", shared_data / "femnist" / "femnist_test.h5")

    for writer in SAMPLE_WRITERS:
        for split in ("train", "test"):
            from_json, from_h5 = getattr(leaf.clients[writer], split), getattr(h5.clients[writer], split)
            assert torch.equal(torch.round(from_json.x * 255), torch.round(from_h5.x * 255))
            assert torch.equal(from_json.y, from_h5.y)


def test_users_are_merged_across_shards_in_train_and_test_directories(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {"u1": {"x": [[0.0, 1.0]], "y": [1]}})
    write_shard(tmp_path / "train" / "b.json", {"u1": {"x": [[2.0, 3.0]], "y": [0]}, "u2": {"x": [[1, 1]], "y": [2]}})
    write_shard(tmp_path / "test" / "a.json", {"u1": {"x": [[5.0, 5.0]], "y": [1]}, "u2": {"x": [[0, 0]], "y": [0]}})

    dataset = load_leaf_json(tmp_path, image_shape=None, held_out_fraction=0.5)

    assert dataset.clients["u1"].train.x.tolist() == [[0.0, 1.0], [2.0, 3.0]]
    assert dataset.clients["u1"].train.y.tolist() == [1, 0]
    assert dataset.num_classes == 3  # the largest label plus one


def test_mismatched_x_and_y_name_the_shard_and_user(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {"u1": {"x": [[0.0], [1.0]], "y": [1]}})
    write_shard(tmp_path / "test" / "a.json", {"u1": {"x": [[0.0]], "y": [1]}})

    with pytest.raises(ValueError, match=r"a.json: user 'u1' has 1 labels but 2 inputs"):
        load_leaf_json(tmp_path, image_shape=None)


def test_a_directory_without_leaf_shards_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"found 0 train and 0 test files"):
        load_leaf_json(tmp_path)


def test_labels_beyond_num_classes_are_refused(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {"u1": {"x": [[0.0]], "y": [5]}, "u2": {"x": [[0.0]], "y": [0]}})
    write_shard(tmp_path / "test" / "a.json", {"u1": {"x": [[0.0]], "y": [1]}, "u2": {"x": [[0.0]], "y": [0]}})

    with pytest.raises(ValueError, match=r"label 5 is out of range for num_classes=3"):
        load_leaf_json(tmp_path, image_shape=None, num_classes=3)


def test_invalid_json_names_the_file(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "test").mkdir()
    (tmp_path / "train" / "broken.json").write_text("{")
    write_shard(tmp_path / "test" / "a.json", {"u1": {"x": [[0.0]], "y": [1]}})

    with pytest.raises(ValueError, match=r"broken.json: invalid json"):
        load_leaf_json(tmp_path, image_shape=None)


def test_flat_inputs_keep_their_width_without_an_image_shape(tmp_path):
    write_shard(tmp_path / "train" / "a.json", {u: {"x": np.ones((2, 60)).tolist(), "y": [0, 1]} for u in "ab"})
    write_shard(tmp_path / "test" / "a.json", {u: {"x": np.ones((1, 60)).tolist(), "y": [1]} for u in "ab"})

    dataset = load_leaf_json(tmp_path, image_shape=None, held_out_fraction=0.5)

    assert dataset.clients["a"].train.x.shape == (2, 60)
