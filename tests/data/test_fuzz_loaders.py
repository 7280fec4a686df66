"""Property-based tests: broken files give a ValueError naming the file, never another exception.

Each test starts from a small valid file written here (TFF h5 or a LEAF json shard) and
breaks it: random bytes, truncation, flipped bytes, generated wrong layouts, mutated json.
A file that still loads must give data the rest of the library can trust.
"""

import json
import math

import h5py
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmeta.data.leaf_json import load_leaf_json
from fedmeta.data.tff_h5 import SHAKESPEARE_VOCAB_SIZE, load_emnist_h5, load_shakespeare_h5

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def write_emnist(path):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        for cid in ("w0", "w1", "w2"):
            handle.create_dataset(f"examples/{cid}/pixels", data=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8))
            handle.create_dataset(f"examples/{cid}/label", data=rng.integers(0, 62, 3).astype(np.int32))
    return path


def write_snippets(path):
    with h5py.File(path, "w") as handle:
        for cid, texts in {"A": [b"to be", b"or not"], "B": [b"to be"], "C": [b"that is"]}.items():
            handle.create_dataset(f"examples/{cid}/snippets", data=np.array(texts, dtype=bytes))
    return path


@pytest.fixture(scope="module")
def emnist_file(folder):
    return write_emnist(folder / "valid_emnist.h5")


@pytest.fixture(scope="module")
def snippets_file(folder):
    return write_snippets(folder / "valid_snippets.h5")


def assert_trustworthy_emnist(dataset):
    for client in dataset.clients.values():
        for split in (client.train, client.test):
            assert len(split) > 0 and split.x.shape[1:] == (1, 28, 28) and split.x.dtype == torch.float32
            assert float(split.x.min()) >= 0.0 and float(split.x.max()) <= 1.0
            assert split.y.dtype == torch.int64 and int(split.y.min()) >= 0 and int(split.y.max()) < 62


def assert_trustworthy_shakespeare(dataset):
    for client in dataset.clients.values():
        for split in (client.train, client.test):
            assert len(split) > 0 and int(split.x.max()) < SHAKESPEARE_VOCAB_SIZE


LOADERS = {"emnist": (load_emnist_h5, assert_trustworthy_emnist),
           "shakespeare": (load_shakespeare_h5, assert_trustworthy_shakespeare)}


def load_or_refuse(kind, broken, partner):
    """Loads ``broken`` beside its valid ``partner``: the data checks out, or a ValueError names the file."""
    load, check = LOADERS[kind]
    try:
        dataset = load(broken, partner, held_out_fraction=0.5)
    except ValueError as error:
        assert broken.name in str(error) and "\n" not in str(error), str(error)
    else:
        check(dataset)


@FUZZ
@given(noise=st.binary(max_size=4096), signed=st.booleans())
def test_random_bytes_named_h5_are_refused_naming_the_file(folder, emnist_file, noise, signed):
    broken = folder / "noise.h5"
    broken.write_bytes(HDF5_SIGNATURE + noise if signed else noise)

    with pytest.raises(ValueError, match="noise.h5: not a readable h5 file"):
        load_emnist_h5(broken, emnist_file)


@FUZZ
@given(fraction=st.floats(min_value=0.0, max_value=1.0, exclude_max=True))
def test_a_truncated_h5_is_refused_naming_the_file(folder, emnist_file, fraction):
    valid = emnist_file.read_bytes()
    broken = folder / "cut.h5"
    broken.write_bytes(valid[: math.floor(fraction * len(valid))])

    with pytest.raises(ValueError, match="cut.h5: not a readable h5 file"):
        load_emnist_h5(emnist_file, broken)


@FUZZ
@given(kind=st.sampled_from(sorted(LOADERS)), data=st.data())
def test_flipped_bytes_in_an_h5_load_cleanly_or_are_refused_naming_the_file(folder, emnist_file, snippets_file,
                                                                            kind, data):
    valid = bytearray((emnist_file if kind == "emnist" else snippets_file).read_bytes())
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(valid) - 1), st.integers(0, 255)), min_size=1,
                               max_size=24))
    for offset, byte in flips:
        valid[offset] = byte
    broken = folder / f"flipped_{kind}.h5"
    broken.write_bytes(bytes(valid))

    load_or_refuse(kind, broken, emnist_file if kind == "emnist" else snippets_file)


ARRAYS = st.builds(
    lambda dtype, shape: np.zeros(shape, dtype=dtype),
    st.sampled_from([np.uint8, np.int32, np.int64, np.float32, np.float64, np.bool_, "S4"]),
    st.lists(st.sampled_from([0, 1, 2, 3, 28]), max_size=3).map(tuple),
)
FEATURES = st.dictionaries(st.sampled_from(["pixels", "label", "snippets", "other"]),
                           st.one_of(ARRAYS, st.just("group")), max_size=3)
CLIENTS = st.dictionaries(st.sampled_from(["w0", "w1", "w2", "w3"]), st.one_of(FEATURES, ARRAYS), max_size=4)


@FUZZ
@given(kind=st.sampled_from(sorted(LOADERS)), clients=CLIENTS, root=st.sampled_from(["examples", "other"]))
def test_generated_wrong_layouts_load_cleanly_or_are_refused_naming_the_file(folder, emnist_file, snippets_file,
                                                                             kind, clients, root):
    broken = folder / f"layout_{kind}.h5"
    with h5py.File(broken, "w") as handle:
        top = handle.create_group(root)
        for cid, content in clients.items():
            if isinstance(content, np.ndarray):
                top.create_dataset(cid, data=content)
                continue
            group = top.create_group(cid)
            for name, value in content.items():
                group.create_group(name) if isinstance(value, str) else group.create_dataset(name, data=value)

    load_or_refuse(kind, broken, broken)


def valid_shard(users):
    return {"users": list(users), "num_samples": [2] * len(users),
            "user_data": {u: {"x": [[0.5, 1.0], [1.0, 0.0]], "y": [0, 1]} for u in users}}


def json_paths(doc, prefix=()):
    """Every (path to) a value in the document, the document itself first."""
    yield prefix
    children = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in children:
        yield from json_paths(value, (*prefix, key))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)


@st.composite
def broken_shards(draw):
    """A valid shard's bytes with one of: a key dropped, a value replaced, a truncation, bytes inserted."""
    doc = valid_shard(["u1", "u2"])
    paths = list(json_paths(doc))
    action = draw(st.sampled_from(["drop", "replace", "truncate", "insert"]))
    if action in ("drop", "replace"):
        path = draw(st.sampled_from(paths[1:]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        if action == "drop":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(JSON_VALUES)
    text = json.dumps(doc).encode()
    if action == "truncate":
        text = text[: draw(st.integers(0, len(text) - 1))]
    elif action == "insert":
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.binary(min_size=1, max_size=4)) + text[at:]
    return text


@FUZZ
@given(text=broken_shards(), broken_split=st.sampled_from(["train", "test"]))
def test_mutated_leaf_shards_load_cleanly_or_are_refused_naming_the_file(folder, text, broken_split):
    valid = json.dumps(valid_shard(["u1", "u2"])).encode()
    shards = {"train": folder / "train_shard.json", "test": folder / "test_shard.json"}
    for split, path in shards.items():
        path.write_bytes(text if split == broken_split else valid)

    try:
        dataset = load_leaf_json(shards["train"], shards["test"], image_shape=None, held_out_fraction=0.5)
    except (ValueError, FileNotFoundError) as error:
        assert "_shard.json" in str(error) and "\n" not in str(error), str(error)
    else:
        for client in dataset.clients.values():
            for split in (client.train, client.test):
                assert len(split) > 0 and bool(torch.isfinite(split.x).all())
                assert int(split.y.min()) >= 0 and int(split.y.max()) < dataset.num_classes
