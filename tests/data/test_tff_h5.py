import h5py
import numpy as np
import pytest
import torch

from fedmeta.data.federated import IGNORE_INDEX, PAPER_HELD_OUT_FRACTION
from fedmeta.data.tff_h5 import (
    BOS_ID, CHAR_VOCAB, EOS_ID, OOV_ID, PAD_ID, count_clients, encode_snippet, load_emnist_h5, load_shakespeare_h5,
)

A, B = 64, 42  # 'a' and 'b': their index in CHAR_VOCAB (63 and 41) plus one for the pad id


@pytest.fixture(scope="module")
def femnist(shared_data):
    folder = shared_data / "femnist"
    return load_emnist_h5(folder / "femnist_train.h5", folder / "femnist_test.h5")


@pytest.fixture(scope="module")
def shakespeare(shared_data):
    folder = shared_data / "shakespeare"
    return load_shakespeare_h5(folder / "shakespeare_train.h5", folder / "shakespeare_test.h5")


def write_emnist(path, clients):
    with h5py.File(path, "w") as handle:
        for cid, (pixels, labels) in clients.items():
            handle.create_dataset(f"examples/{cid}/pixels", data=pixels)
            handle.create_dataset(f"examples/{cid}/label", data=labels)
    return path


def write_snippets(path, clients):
    with h5py.File(path, "w") as handle:
        for cid, snippets in clients.items():
            handle.create_dataset(f"examples/{cid}/snippets", data=np.array(snippets, dtype=bytes))
    return path


def images(n, label=0):
    return np.zeros((n, 28, 28), np.uint8), np.full(n, label, np.int32)


def test_femnist_has_the_readme_counts_of_writers_and_examples(femnist):
    assert len(femnist.clients) == 396
    assert femnist.info["num_train_examples"] == 54_149
    assert femnist.info["num_test_examples"] == 6_214
    assert sum(len(c.train) for c in femnist.clients.values()) == 54_149
    assert sum(len(c.test) for c in femnist.clients.values()) == 6_214


def test_femnist_holds_out_the_papers_share_of_writers(femnist):
    assert len(femnist.held_out_ids) == round(PAPER_HELD_OUT_FRACTION * 396) == 105
    assert len(femnist.train_ids) == 291


def test_femnist_pixels_are_uint8_levels_over_255_with_a_white_background(femnist):
    x = torch.cat([c.train.x for c in femnist.clients.values()])

    assert x.dtype == torch.float32 and x.shape[1:] == (1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) == 1.0
    assert torch.equal(torch.round(x * 255) / 255, x)
    assert float((x == 1.0).float().mean()) > 0.5  # most of a character image is background


def test_femnist_labels_cover_all_62_classes(femnist):
    labels = torch.cat([c.train.y for c in femnist.clients.values()])

    assert femnist.num_classes == 62
    assert labels.dtype == torch.int64
    assert torch.equal(torch.unique(labels), torch.arange(62))


def test_max_clients_keeps_the_first_writers_by_id(shared_data, femnist):
    folder = shared_data / "femnist"

    first = load_emnist_h5(folder / "femnist_train.h5", folder / "femnist_test.h5", max_clients=10)

    writer = sorted(femnist.clients)[0]
    assert sorted(first.clients) == sorted(femnist.clients)[:10]
    assert torch.equal(first.clients[writer].train.x, femnist.clients[writer].train.x)


def test_uint8_and_float32_pixels_load_to_the_same_tensors(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    labels = np.array([1, 61, 0], dtype=np.int32)
    as_uint8 = write_emnist(tmp_path / "u8.h5", {"w1": (pixels, labels), "w2": (pixels, labels)})
    as_float = write_emnist(tmp_path / "f32.h5", {"w1": (pixels.astype(np.float32) / 255, labels),
                                                  "w2": (pixels.astype(np.float32) / 255, labels)})

    from_uint8 = load_emnist_h5(as_uint8, as_uint8, held_out_fraction=0.5)
    from_float = load_emnist_h5(as_float, as_float, held_out_fraction=0.5)

    assert torch.equal(from_uint8.clients["w1"].train.x, from_float.clients["w1"].train.x)
    assert from_uint8.clients["w1"].train.x.shape == (3, 1, 28, 28)
    assert torch.equal(from_uint8.clients["w1"].train.y, torch.tensor([1, 61, 0]))


def test_mismatched_labels_and_images_name_the_file_and_client(tmp_path):
    bad = write_emnist(tmp_path / "bad.h5", {"f0424_27": (np.zeros((11, 28, 28), np.uint8), np.zeros(12, np.int32))})

    with pytest.raises(ValueError, match=r"bad.h5: client 'f0424_27' has 12 labels but 11 images"):
        load_emnist_h5(bad, bad)


def test_labels_outside_emnist_62_are_refused(tmp_path):
    bad = write_emnist(tmp_path / "bad.h5", {"w": (np.zeros((2, 28, 28), np.uint8), np.array([0, 62], np.int32))})

    with pytest.raises(ValueError, match=r"bad.h5: client 'w': labels must be in 0..61, found 0..62"):
        load_emnist_h5(bad, bad)


def test_float_pixels_outside_the_unit_range_are_refused(tmp_path):
    pixels = np.full((2, 28, 28), 255.0, np.float32)
    bad = write_emnist(tmp_path / "bad.h5", {"w": (pixels, np.zeros(2, np.int32))})

    with pytest.raises(ValueError, match=r"bad.h5: client 'w': float pixels must be in \[0, 1\], found 255..255"):
        load_emnist_h5(bad, bad)


def test_a_client_without_labels_is_named(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as handle:
        handle.create_dataset("examples/w/pixels", data=np.zeros((2, 28, 28), np.uint8))

    with pytest.raises(ValueError, match=r"bad.h5: client 'w' has no 'label' dataset \(has \['pixels'\]\)"):
        load_emnist_h5(tmp_path / "bad.h5", tmp_path / "bad.h5")


def test_a_writer_missing_from_the_test_file_is_named(tmp_path):
    train = write_emnist(tmp_path / "train.h5", {"w1": images(2), "w2": images(2), "w3": images(2)})
    test = write_emnist(tmp_path / "test.h5", {"w1": images(1), "w2": images(1)})

    with pytest.raises(ValueError, match=r"test.h5: has no client 'w3' of train.h5 \(1 clients are missing\)"):
        load_emnist_h5(train, test)


@pytest.mark.parametrize("load, name, train, test", [
    (load_emnist_h5, "emnist", "fed_emnist_train.h5", "fed_emnist_test.h5"),
    (load_shakespeare_h5, "shakespeare", "shakespeare_train.h5", "shakespeare_test.h5"),
])
def test_a_missing_file_says_how_to_download_it(tmp_path, load, name, train, test):
    with pytest.raises(FileNotFoundError, match=rf"{train}: no such file; run `fedmeta data download {name}`, "
                                                rf"or put {train} and {test} in one directory"):
        load(tmp_path / train, tmp_path / test)


def test_a_file_without_the_tff_layout_is_refused(tmp_path):
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle.create_dataset("pixels", data=np.zeros(3))

    with pytest.raises(ValueError, match=r"other.h5: no /examples group"):
        load_emnist_h5(tmp_path / "other.h5", tmp_path / "other.h5")


def test_max_clients_below_two_is_refused(tmp_path):
    path = write_emnist(tmp_path / "w.h5", {"w1": images(2), "w2": images(2)})

    with pytest.raises(ValueError, match=r"max_clients must be >= 2 .* got 1"):
        load_emnist_h5(path, path, max_clients=1)


def test_shakespeare_has_the_readme_counts_of_roles_and_snippets(shakespeare):
    assert len(shakespeare.clients) == 715
    assert shakespeare.info["num_train_snippets"] == 16_068
    assert shakespeare.info["num_test_snippets"] == 2_356
    assert shakespeare.num_classes == 90


def test_every_real_snippet_starts_exactly_one_sequence_with_bos(shakespeare):
    train_starts = sum(int((c.train.x[:, 0] == BOS_ID).sum()) for c in shakespeare.clients.values())
    test_starts = sum(int((c.test.x[:, 0] == BOS_ID).sum()) for c in shakespeare.clients.values())
    anywhere = sum(int((c.train.x == BOS_ID).sum()) for c in shakespeare.clients.values())

    assert train_starts == anywhere == 16_068
    assert test_starts == 2_356
    assert shakespeare.info["num_train_sequences"] == sum(len(c.train) for c in shakespeare.clients.values())


def test_real_sequences_decode_back_to_the_snippet_text(shared_data, shakespeare):
    with h5py.File(shared_data / "shakespeare" / "shakespeare_train.h5", "r") as handle:
        client_id = sorted(handle["examples"])[0]
        first = bytes(handle["examples"][client_id]["snippets"][0])
    x = shakespeare.clients[client_id].train.x[0]

    decoded = "".join(CHAR_VOCAB[i - 1] for i in x[1:].tolist() if 1 <= i <= len(CHAR_VOCAB))

    assert int(x[0]) == BOS_ID
    assert decoded == first.decode()[:79]


def test_shakespeare_targets_are_the_inputs_shifted_by_one(shakespeare):
    client = shakespeare.train_clients()[0]
    x, y = client.train.x, client.train.y
    counted = y[:, :-1] != IGNORE_INDEX

    assert x.shape[1] == y.shape[1] == 80 and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:][counted], y[:, :-1][counted])
    assert int(x.max()) < 90 and int(y.max()) < 90


def test_a_short_snippet_is_bos_characters_eos_then_ignored_padding():
    inputs, targets = encode_snippet(b"ab", sequence_length=5)

    assert inputs.tolist() == [[BOS_ID, A, B, EOS_ID, PAD_ID]]
    assert targets.tolist() == [[A, B, EOS_ID, IGNORE_INDEX, IGNORE_INDEX]]


def test_a_long_snippet_is_cut_into_disjoint_chunks_of_sequence_length_plus_one():
    inputs, targets = encode_snippet(b"dhlptx@", sequence_length=4)  # ids 1..7: 9 ids with BOS and EOS

    # chunks [BOS 1 2 3 4] [5 6 7 EOS pad], as TFF: 5 opens the second chunk and is never a target
    assert inputs.tolist() == [[BOS_ID, 1, 2, 3], [5, 6, 7, EOS_ID]]
    assert targets.tolist() == [[1, 2, 3, 4], [6, 7, EOS_ID, IGNORE_INDEX]]


def test_a_last_chunk_holding_only_eos_has_no_target_and_is_dropped():
    inputs, targets = encode_snippet(b"dhlp", sequence_length=4)  # 6 ids: [BOS 1 2 3 4] [EOS pad pad pad pad]

    assert inputs.tolist() == [[BOS_ID, 1, 2, 3]]
    assert targets.tolist() == [[1, 2, 3, 4]]


def test_bytes_outside_the_vocabulary_are_oov_and_an_empty_snippet_is_bos_eos():
    inputs, _ = encode_snippet("é}".encode(), sequence_length=8)
    empty_inputs, empty_targets = encode_snippet(b"", sequence_length=3)

    assert inputs[0, :5].tolist() == [BOS_ID, OOV_ID, OOV_ID, OOV_ID, EOS_ID]  # é is two bytes, as in TFF
    assert empty_inputs.tolist() == [[BOS_ID, EOS_ID, PAD_ID]]
    assert empty_targets.tolist() == [[EOS_ID, IGNORE_INDEX, IGNORE_INDEX]]


def test_a_shakespeare_file_pair_is_encoded_snippet_by_snippet_per_client(tmp_path):
    train = write_snippets(tmp_path / "train.h5", {"PLAY_A": [b"ab", b"dh"], "PLAY_B": [b"x"]})
    test = write_snippets(tmp_path / "test.h5", {"PLAY_A": [b"l"], "PLAY_B": [b"p"]})

    dataset = load_shakespeare_h5(train, test, held_out_fraction=0.5, sequence_length=4)

    assert dataset.info["num_train_snippets"] == 3 and dataset.info["num_test_snippets"] == 2
    assert dataset.info["num_train_sequences"] == 3 and dataset.info["num_test_sequences"] == 2
    assert dataset.clients["PLAY_A"].train.x.tolist() == [[BOS_ID, A, B, EOS_ID], [BOS_ID, 1, 2, EOS_ID]]
    assert dataset.clients["PLAY_B"].test.y.tolist() == [[4, EOS_ID, IGNORE_INDEX, IGNORE_INDEX]]


def test_snippets_that_are_not_bytes_are_refused(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as handle:
        handle.create_dataset("examples/ROLE/snippets", data=np.arange(3))

    with pytest.raises(ValueError, match=r"bad.h5: client 'ROLE': snippets have shape \(3,\) and dtype int64"):
        load_shakespeare_h5(tmp_path / "bad.h5", tmp_path / "bad.h5")


def test_some_empty_writers_are_dropped_and_counted(tmp_path):
    train = write_emnist(tmp_path / "train.h5", {"w1": images(2), "w2": images(2), "empty": images(0)})
    test = write_emnist(tmp_path / "test.h5", {"w1": images(1), "w2": images(1), "empty": images(1)})

    dataset = load_emnist_h5(train, test, held_out_fraction=0.5)

    assert sorted(dataset.clients) == ["w1", "w2"]
    assert dataset.info["dropped_clients"] == 1


def test_fewer_than_two_writers_with_examples_in_both_files_name_the_pair(tmp_path):
    train = write_emnist(tmp_path / "train.h5", {"w1": images(2), "w2": images(0)})
    test = write_emnist(tmp_path / "test.h5", {"w1": images(1), "w2": images(1)})

    with pytest.raises(ValueError, match=r"train.h5: 1 of its 2 clients have examples both here and in test.h5; "
                                         r"at least 2 are needed \(a training and a held-out client\)"):
        load_emnist_h5(train, test)


def test_an_examples_dataset_instead_of_a_group_is_refused(tmp_path):
    with h5py.File(tmp_path / "flat.h5", "w") as handle:
        handle.create_dataset("examples", data=np.zeros(3))

    with pytest.raises(ValueError, match=r"flat.h5: /examples is a Dataset, not a group; expected TFF's layout"):
        load_emnist_h5(tmp_path / "flat.h5", tmp_path / "flat.h5")


def test_a_client_name_that_is_not_utf8_is_named(tmp_path):
    # found by fuzzing: h5py lists such a name as bytes, and sorting it with str names raised TypeError
    path = write_emnist(tmp_path / "names.h5", {"w1": images(2), "w2": images(2)})
    with h5py.File(path, "a") as handle:
        handle.create_group(b"examples/w\xff")

    with pytest.raises(ValueError, match=r"names.h5: client name b'w\\xff' is not UTF-8 text"):
        load_emnist_h5(path, path)


def test_a_feature_that_is_a_named_datatype_is_refused(tmp_path):
    # found by fuzzing: a committed datatype where a dataset belongs raised TypeError when read
    path = write_emnist(tmp_path / "types.h5", {"w1": images(2), "w2": images(2)})
    with h5py.File(path, "a") as handle:
        del handle["examples/w1/pixels"]
        handle["examples/w1/pixels"] = np.dtype("f4")

    with pytest.raises(ValueError, match=r"types.h5: client 'w1': 'pixels' is a Datatype, not a dataset"):
        load_emnist_h5(path, path)


@pytest.mark.parametrize("value", ["abc", h5py.Empty("f4")])
def test_a_scalar_or_empty_feature_is_refused_with_its_shape(tmp_path, value):
    path = write_emnist(tmp_path / "scalar.h5", {"w1": images(2), "w2": images(2)})
    with h5py.File(path, "a") as handle:
        del handle["examples/w2/pixels"]
        handle.create_dataset("examples/w2/pixels", data=value)

    with pytest.raises(ValueError, match=r"scalar.h5: client 'w2': pixels have shape \(\), expected \[n, 28, 28\]"):
        load_emnist_h5(path, path)


def test_flipped_metadata_bytes_are_a_corrupt_file_naming_it(tmp_path):
    path = write_emnist(tmp_path / "flipped.h5", {"w1": images(2), "w2": images(2)})
    with h5py.File(path, "r") as handle:
        address = h5py.h5o.get_info(handle["examples/w2/label"].id).addr
    with open(path, "r+b") as handle:
        handle.seek(address)
        handle.write(b"\xff" * 16)

    with pytest.raises(ValueError, match=r"flipped.h5: corrupt h5 file \(Unable to synchronously open object"):
        load_emnist_h5(path, path)


def test_a_snippet_that_is_not_utf8_is_named_with_the_offending_byte(tmp_path):
    path = write_snippets(tmp_path / "roles.h5", {"A": [b"fine", b"ab\xc3("], "B": [b"x"]})

    with pytest.raises(ValueError, match=r"roles.h5: client 'A': snippet 1 is not UTF-8 text "
                                         r"\(byte 0xc3 at offset 2\)"):
        load_shakespeare_h5(path, path)


def test_count_clients_reads_the_names_and_no_example(tmp_path):
    broken = np.zeros((2, 27, 28), np.uint8), np.zeros(2, np.int32)  # loading it would fail on its shape
    path = write_emnist(tmp_path / "writers.h5", {"w1": images(2), "w2": broken, "w3": images(1)})

    count = count_clients(path, "emnist")

    assert count == 3
    with pytest.raises(ValueError, match=r"client 'w2': pixels have shape \(2, 27, 28\)"):
        load_emnist_h5(path, path)
