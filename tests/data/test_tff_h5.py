import h5py
import numpy as np
import pytest
import torch

from fedmeta.data.federated import IGNORE_INDEX, PAPER_HELD_OUT_FRACTION
from fedmeta.data.tff_h5 import (
    BOS_ID, EOS_ID, OOV_ID, PAD_ID, SHAKESPEARE_VOCAB_SIZE, encode_snippet, load_emnist_h5, load_shakespeare_h5,
)


@pytest.fixture(scope="module")
def femnist(shared_data):
    return load_emnist_h5(shared_data / "femnist" / "femnist_train.h5", shared_data / "femnist" / "femnist_test.h5")


@pytest.fixture(scope="module")
def shakespeare(shared_data):
    folder = shared_data / "shakespeare"
    return load_shakespeare_h5(folder / "shakespeare_train.h5", folder / "shakespeare_test.h5")


def write_emnist(path, clients):
    with h5py.File(path, "w") as handle:
        for cid, (pixels, labels) in clients.items():
            handle.create_dataset(f"examples/{cid}/pixels", data=pixels)
            handle.create_dataset(f"examples/{cid}/label", data=labels)


def write_snippets(path, clients):
    with h5py.File(path, "w") as handle:
        for cid, snippets in clients.items():
            handle.create_dataset(f"examples/{cid}/snippets", data=np.array(snippets, dtype=bytes))


def test_femnist_counts_match_the_data_readme(femnist):
    assert len(femnist.clients) == 396
    assert femnist.info["num_train_examples"] == 54_149
    assert femnist.info["num_test_examples"] == 6_214
    assert sum(c.num_train for c in femnist.clients.values()) == 54_149


def test_femnist_holds_out_the_papers_share_of_writers(femnist):
    assert len(femnist.held_out_ids) == round(PAPER_HELD_OUT_FRACTION * 396) == 105
    assert len(femnist.train_ids) == 291


def test_femnist_images_are_float_in_unit_range_with_62_classes(femnist):
    client = femnist.clients["f0424_27"] if "f0424_27" in femnist.clients else femnist.train_clients()[0]

    assert client.train.x.dtype == torch.float32
    assert client.train.x.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(client.train.x.min()) and float(client.train.x.max()) <= 1.0
    assert femnist.num_classes == 62
    labels = torch.cat([c.train.y for c in femnist.clients.values()])
    assert labels.dtype == torch.int64 and int(labels.min()) == 0 and int(labels.max()) == 61


def test_uint8_and_float32_pixels_load_to_the_same_tensors(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([1, 61, 0], dtype=np.int32)
    write_emnist(tmp_path / "u8_train.h5", {"w1": (pixels, labels), "w2": (pixels, labels)})
    write_emnist(tmp_path / "f32_train.h5", {"w1": (pixels / 255.0, labels), "w2": (pixels / 255.0, labels)})

    as_uint8 = load_emnist_h5(tmp_path / "u8_train.h5", tmp_path / "u8_train.h5", held_out_fraction=0.5)
    as_float = load_emnist_h5(tmp_path / "f32_train.h5", tmp_path / "f32_train.h5", held_out_fraction=0.5)

    assert torch.equal(as_uint8.clients["w1"].train.x, as_float.clients["w1"].train.x)
    assert torch.equal(as_uint8.clients["w1"].train.y, torch.tensor([1, 61, 0]))


def test_mismatched_labels_and_images_name_the_file_and_client(tmp_path):
    write_emnist(tmp_path / "bad.h5", {"f0424_27": (np.zeros((11, 28, 28), np.uint8), np.zeros(12, np.int32))})

    with pytest.raises(ValueError, match=r"bad.h5: client 'f0424_27' has 12 labels but 11 images"):
        load_emnist_h5(tmp_path / "bad.h5", tmp_path / "bad.h5")


def test_labels_outside_emnist_62_are_refused(tmp_path):
    write_emnist(tmp_path / "bad.h5", {"w": (np.zeros((2, 28, 28), np.uint8), np.array([0, 62], np.int32))})

    with pytest.raises(ValueError, match=r"bad.h5: client 'w': labels must be in 0..61, found 0..62"):
        load_emnist_h5(tmp_path / "bad.h5", tmp_path / "bad.h5")


def test_missing_file_says_how_to_download_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"fed_emnist_train.h5: no such file; run `fedmeta data download emnist`"):
        load_emnist_h5(tmp_path / "fed_emnist_train.h5", tmp_path / "fed_emnist_test.h5")


def test_a_file_without_the_tff_layout_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle.create_dataset("pixels", data=np.zeros(3))

    with pytest.raises(ValueError, match=r"other.h5: no /examples group"):
        load_emnist_h5(tmp_path / "other.h5", tmp_path / "other.h5")


def test_max_clients_keeps_the_first_writers_by_id(shared_data):
    folder = shared_data / "femnist"

    dataset = load_emnist_h5(folder / "femnist_train.h5", folder / "femnist_test.h5", max_clients=10)

    assert len(dataset.clients) == 10
    assert sorted(dataset.clients) == sorted(dataset.clients)[:10]


def test_shakespeare_counts_match_the_data_readme(shakespeare):
    assert len(shakespeare.clients) == 715
    assert shakespeare.info["num_train_snippets"] == 16_068
    assert shakespeare.info["num_test_snippets"] == 2_356
    assert shakespeare.num_classes == SHAKESPEARE_VOCAB_SIZE == 90


def test_shakespeare_targets_are_the_inputs_shifted_by_one(shakespeare):
    client = shakespeare.train_clients()[0]
    x, y = client.train.x, client.train.y

    assert x.shape[1] == y.shape[1] == 80
    assert torch.equal(x[:, 1:][y[:, :-1] != IGNORE_INDEX], y[:, :-1][y[:, :-1] != IGNORE_INDEX])
    assert int(x.max()) < 90 and int(y.max()) < 90


def test_snippet_encoding_by_hand():
    inputs, targets = encode_snippet(b"ab", sequence_length=4)

    # vocabulary: 'a' is character 64 (63 before it, then the pad id 0)
    a, b = 64, 42
    assert inputs.tolist() == [[BOS_ID, a, b, EOS_ID]]
    assert targets.tolist() == [[a, b, EOS_ID, IGNORE_INDEX]]


def test_long_snippets_become_windows_that_predict_every_character_once():
    inputs, targets = encode_snippet(b"dhlptx@", sequence_length=4)  # ids 1..7, nine with BOS and EOS

    assert inputs.tolist() == [[BOS_ID, 1, 2, 3], [4, 5, 6, 7]]  # windows of 5 ids overlap by one
    assert targets.tolist() == [[1, 2, 3, 4], [5, 6, 7, EOS_ID]]


def test_characters_outside_the_vocabulary_map_to_oov_and_empty_snippets_to_bos_eos():
    inputs, targets = encode_snippet("é~".encode(), sequence_length=8)
    empty_inputs, empty_targets = encode_snippet(b"", sequence_length=3)

    assert inputs[0, :5].tolist() == [BOS_ID, OOV_ID, OOV_ID, OOV_ID, EOS_ID]  # é is two bytes
    assert empty_inputs.tolist() == [[BOS_ID, EOS_ID, PAD_ID]]
    assert empty_targets.tolist() == [[EOS_ID, IGNORE_INDEX, IGNORE_INDEX]]


def test_shakespeare_file_pair_is_read_per_client(tmp_path):
    write_snippets(tmp_path / "train.h5", {"PLAY_A": [b"ab", b"dh"], "PLAY_B": [b"x"]})
    write_snippets(tmp_path / "test.h5", {"PLAY_A": [b"l"], "PLAY_B": [b"p"]})

    dataset = load_shakespeare_h5(tmp_path / "train.h5", tmp_path / "test.h5", held_out_fraction=0.5,
                                  sequence_length=4)

    assert dataset.info["num_train_snippets"] == 3
    assert dataset.clients["PLAY_A"].train.x.tolist() == [[BOS_ID, 64, 42, EOS_ID], [BOS_ID, 1, 2, EOS_ID]]
    assert dataset.clients["PLAY_B"].test.y.tolist() == [[4, EOS_ID, IGNORE_INDEX, IGNORE_INDEX]]
