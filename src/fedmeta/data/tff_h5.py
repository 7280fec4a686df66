"""Loaders for TensorFlow Federated's h5 files: ``/examples/<client>/<feature>``.

EMNIST-62 / FEMNIST (``pixels``, ``label``) as in ``fed_emnist_{train,test}.h5``, and
Shakespeare (``snippets``) as in ``shakespeare_{train,test}.h5``. Each client's
examples are already split across the train and test file, so both files must hold the
same clients; the loaders keep that split and add the seeded split of clients into
training and held-out clients (``split_clients``).

Shakespeare is tokenized as TFF's baselines do
(``tff.simulation.baselines.shakespeare.char_prediction_preprocessing``).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import torch

from fedmeta.data.download import DATASETS
from fedmeta.data.federated import (
    IGNORE_INDEX, PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients,
)

EMNIST_CLASSES = 62

# TFF's Shakespeare vocabulary: id 0 pads, characters are 1..86, then out-of-vocabulary,
# beginning and end of snippet.
CHAR_VOCAB = list("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r")
PAD_ID = 0
OOV_ID = len(CHAR_VOCAB) + 1
BOS_ID = len(CHAR_VOCAB) + 2
EOS_ID = len(CHAR_VOCAB) + 3
SHAKESPEARE_VOCAB_SIZE = len(CHAR_VOCAB) + 4
SEQUENCE_LENGTH = 80

# TFF splits snippets into bytes (tf.strings.bytes_split), so a multi-byte UTF-8
# character is several OOV ids; a byte table does the same.
_BYTE_TO_ID = np.full(256, OOV_ID, dtype=np.int64)
_BYTE_TO_ID[[ord(c) for c in CHAR_VOCAB]] = np.arange(1, len(CHAR_VOCAB) + 1)

# Reads one client's h5 group ("<file>: client '<id>'" names it in errors) and returns
# its examples and how many records (images, snippets) they came from.
_ClientReader = Callable[[str, h5py.Group], tuple[Examples, int]]


@contextmanager
def _corruption_named(path: str | Path) -> Iterator[None]:
    """Re-raises what h5py raises on a damaged file (OSError, KeyError, RuntimeError) as a ValueError naming it."""
    try:
        yield
    except (OSError, KeyError, RuntimeError) as error:
        detail = error.args[0] if isinstance(error, KeyError) and error.args else error  # str() would quote it
        raise ValueError(f"{path}: corrupt h5 file ({detail})") from None


def _open(path: Path, dataset: str) -> h5py.File:
    if not path.is_file():
        train, test = DATASETS[dataset].files
        raise FileNotFoundError(
            f"{path}: no such file; run `fedmeta data download {dataset}`, or put {train} and {test} "
            "in one directory and point data.path at it"
        )
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path}: not a readable h5 file ({error})") from None
    try:
        with _corruption_named(path):
            examples = handle.get("examples")
        if not isinstance(examples, h5py.Group):
            found = ("no /examples group" if examples is None
                     else f"/examples is a {type(examples).__name__}, not a group")
            raise ValueError(f"{path}: {found}; expected TFF's layout /examples/<client>/<feature>")
    except ValueError:
        handle.close()
        raise
    return handle


def _client_ids(handle: h5py.File) -> set[str]:
    """The names under /examples (bytes for a name that is not UTF-8)."""
    with _corruption_named(handle.filename):
        return set(handle["examples"])


def _paired_ids(train: h5py.File, test: h5py.File) -> list[str]:
    """Client ids of the pair, sorted; both files must hold the same ones."""
    names = Path(train.filename).name, Path(test.filename).name
    ids = _client_ids(train), _client_ids(test)
    for name, found in zip(names, ids):
        undecoded = [cid for cid in found if not isinstance(cid, str)]
        if undecoded:
            raise ValueError(f"{name}: client name {undecoded[0]!r} is not UTF-8 text")
    for here, there in ((0, 1), (1, 0)):
        missing = sorted(ids[here] - ids[there])
        if missing:
            raise ValueError(
                f"{names[there]}: has no client {missing[0]!r} of {names[here]} ({len(missing)} clients "
                "are missing); the train and test files must come from the same dataset"
            )
    return sorted(ids[0])


def count_clients(path: str | Path, dataset: str) -> int:
    """How many clients (writers, roles) an h5 file of ``dataset`` holds, from their names alone.

    Reads no examples, so it is quick even on TFF's 3,400-writer EMNIST.
    """
    path = Path(path)
    with _open(path, dataset) as handle:
        return len(_client_ids(handle))


def label_counts(path: str | Path, max_clients: int | None = None) -> np.ndarray:
    """How many examples of each of EMNIST-62's labels an EMNIST h5 file holds (its first ``max_clients`` writers).

    Reads the labels alone, not the pixels.
    """
    counts = np.zeros(EMNIST_CLASSES, dtype=np.int64)
    with _open(Path(path), "emnist") as handle:
        for cid in sorted(_client_ids(handle))[:max_clients]:
            labels = np.asarray(handle["examples"][cid]["label"][()], dtype=np.int64)
            counts += np.bincount(labels, minlength=EMNIST_CLASSES)[:EMNIST_CLASSES]
    return counts


def _read_file(handle: h5py.File, ids: list[str], read: _ClientReader) -> tuple[dict[str, Examples], int]:
    where = Path(handle.filename).name
    examples, records = {}, 0
    for cid in ids:
        group = handle["examples"][cid]
        if not isinstance(group, h5py.Group):
            raise ValueError(f"{where}: client {cid!r} is a {type(group).__name__}, not a group of features "
                             "(expected /examples/<client>/<feature>)")
        examples[cid], count = read(f"{where}: client {cid!r}", group)
        records += count
    return examples, records


def _read_pair(train_path: str | Path, test_path: str | Path, dataset: str, read: _ClientReader,
               max_clients: int | None) -> tuple[dict[str, ClientData], int, int]:
    """Reads the first ``max_clients`` clients (by id) of both files.

    Returns the clients and how many records the train and the test file gave them.
    Clients empty in either file are kept (``split_clients`` drops and counts them), but
    fewer than two with examples in both files is an error naming the pair.
    """
    if max_clients is not None and max_clients < 2:
        raise ValueError(f"max_clients must be >= 2 (a training and a held-out client), got {max_clients}")
    train_path, test_path = Path(train_path), Path(test_path)
    with _open(train_path, dataset) as train_file, _open(test_path, dataset) as test_file:
        ids = _paired_ids(train_file, test_file)[:max_clients]
        with _corruption_named(train_path):
            train, num_train = _read_file(train_file, ids, read)
        with _corruption_named(test_path):
            test, num_test = _read_file(test_file, ids, read)
    usable = sum(1 for cid in ids if len(train[cid]) and len(test[cid]))
    if usable < 2:
        raise ValueError(f"{train_path}: {usable} of its {len(ids)} clients have examples both here and in "
                         f"{test_path.name}; at least 2 are needed (a training and a held-out client)")
    return {cid: ClientData(cid, train[cid], test[cid]) for cid in ids}, num_train, num_test


def _feature(where: str, group: h5py.Group, name: str) -> np.ndarray:
    found = sorted(str(k) for k in group)  # str: a damaged name comes back as bytes
    if name not in found:
        raise ValueError(f"{where} has no {name!r} dataset (has {found})")
    if not isinstance(group[name], h5py.Dataset):
        raise ValueError(f"{where}: {name!r} is a {type(group[name]).__name__}, not a dataset")
    return np.asarray(group[name][()])  # a scalar dataset reads as bytes or h5py.Empty, not an array


def _emnist_examples(where: str, group: h5py.Group) -> tuple[Examples, int]:
    pixels = _feature(where, group, "pixels")
    labels = _feature(where, group, "label")
    if pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
        raise ValueError(f"{where}: pixels have shape {pixels.shape}, expected [n, 28, 28]")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{where}: labels have shape {labels.shape} and dtype {labels.dtype}, expected [n] integers")
    if len(labels) != len(pixels):
        raise ValueError(f"{where} has {len(labels)} labels but {len(pixels)} images")
    if len(labels) and not (labels.min() >= 0 and labels.max() < EMNIST_CLASSES):
        raise ValueError(f"{where}: labels must be in 0..{EMNIST_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    if pixels.dtype == np.uint8:  # the LEAF-built files store 0..255
        x = pixels.astype(np.float32) / 255.0
    elif pixels.dtype.kind == "f":  # TFF's official files store [0, 1]
        x = pixels.astype(np.float32)
        if len(x) and not (x.min() >= 0.0 and x.max() <= 1.0):
            raise ValueError(f"{where}: float pixels must be in [0, 1], found {x.min():g}..{x.max():g}")
    else:
        raise ValueError(f"{where}: pixels have dtype {pixels.dtype}, expected uint8 or float32")
    return Examples(torch.from_numpy(x[:, None]), torch.from_numpy(labels.astype(np.int64))), len(labels)


def load_emnist_h5(train_path: str | Path, test_path: str | Path, *,
                   held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0,
                   max_clients: int | None = None) -> FederatedDataset:
    """EMNIST-62 writers as clients: x ``[n, 1, 28, 28]`` float32 in [0, 1], y int64 in 0..61.

    Reads TFF's ``fed_emnist_{train,test}.h5`` (float32 pixels in [0, 1]) or the
    LEAF-built ``femnist_{train,test}.h5`` (uint8 pixels, divided by 255): both give the
    same tensors, 1.0 being the white background.

    Args:
        train_path: the h5 file of every writer's train examples.
        test_path: the h5 file of the same writers' test examples.
        held_out_fraction: share of writers only evaluated (see ``split_clients``).
        seed: seeds the split into training and held-out writers.
        max_clients: keep only the first writers by id (quick runs); ``None`` keeps all.

    Returns:
        The dataset, named ``"emnist"``, with ``info["num_train_examples"]`` and
        ``info["num_test_examples"]``.

    Raises:
        FileNotFoundError: a file is missing (the message says how to download it).
        ValueError: the files differ in writers, or a writer's data is malformed; the
            message names the file and the writer.
    """
    clients, num_train, num_test = _read_pair(train_path, test_path, "emnist", _emnist_examples, max_clients)
    info = {"num_train_examples": num_train, "num_test_examples": num_test}
    return split_clients(clients, num_classes=EMNIST_CLASSES, held_out_fraction=held_out_fraction, seed=seed,
                         name="emnist", info=info)


def encode_snippet(snippet: bytes, sequence_length: int = SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """One snippet as next-character sequences: (inputs, targets), each ``[m, sequence_length]``.

    As in TFF, the ids ``[BOS] + bytes + [EOS]`` are padded with ``PAD_ID`` to a multiple
    of ``sequence_length + 1`` and cut into chunks of that length; a chunk's inputs are
    its first ``sequence_length`` ids and its targets the last ``sequence_length``, so
    the first id of every chunk after the first is never a target. Padding targets are
    ``IGNORE_INDEX``. A last chunk holding a single id has no target at all and is
    dropped (TFF keeps it, but it would count as an example while teaching nothing).
    """
    ids = np.concatenate([[BOS_ID], _BYTE_TO_ID[np.frombuffer(snippet, dtype=np.uint8)], [EOS_ID]])
    chunk = sequence_length + 1
    padded = np.full(-(-len(ids) // chunk) * chunk, PAD_ID, dtype=np.int64)
    padded[: len(ids)] = ids
    chunks = padded.reshape(-1, chunk)
    inputs, targets = chunks[:, :-1], chunks[:, 1:].copy()
    targets[targets == PAD_ID] = IGNORE_INDEX  # 0 is never a character id
    keep = (targets != IGNORE_INDEX).any(axis=1)
    return inputs[keep], targets[keep]


def _utf8_snippet(where: str, index: int, snippet: object) -> bytes:
    """The snippet's bytes, which must be UTF-8 text (as all of TFF's are): other bytes mean a damaged file."""
    if not isinstance(snippet, bytes):  # an object dataset of something other than strings
        raise ValueError(f"{where}: snippet {index} is a {type(snippet).__name__}, expected a byte string")
    try:
        snippet.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{where}: snippet {index} is not UTF-8 text (byte 0x{snippet[error.start]:02x} at "
                         f"offset {error.start})") from None
    return snippet


def _shakespeare_examples(sequence_length: int) -> _ClientReader:
    def read(where: str, group: h5py.Group) -> tuple[Examples, int]:
        snippets = _feature(where, group, "snippets")
        if snippets.ndim != 1 or snippets.dtype.kind not in "SO":
            raise ValueError(f"{where}: snippets have shape {snippets.shape} and dtype {snippets.dtype}, "
                             "expected [n] byte strings")
        texts = [_utf8_snippet(where, i, s) for i, s in enumerate(snippets)]
        parts = [encode_snippet(text, sequence_length) for text in texts]
        empty = np.zeros((0, sequence_length), dtype=np.int64)
        inputs = np.concatenate([empty, *(p[0] for p in parts)])
        targets = np.concatenate([empty, *(p[1] for p in parts)])
        return Examples(torch.from_numpy(inputs), torch.from_numpy(targets)), len(snippets)

    return read


def load_shakespeare_h5(train_path: str | Path, test_path: str | Path, *,
                        held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0,
                        max_clients: int | None = None,
                        sequence_length: int = SEQUENCE_LENGTH) -> FederatedDataset:
    """Speaking roles as clients: x, y ``[m, sequence_length]`` int64 character ids.

    Each snippet is encoded on its own by ``encode_snippet`` (TFF's tokenization, 90
    ids); targets are the inputs shifted by one, padding targets ``IGNORE_INDEX``.

    Args:
        train_path: the h5 file of every role's train snippets.
        test_path: the h5 file of the same roles' test snippets.
        held_out_fraction: share of roles only evaluated (see ``split_clients``).
        seed: seeds the split into training and held-out roles.
        max_clients: keep only the first roles by id (quick runs); ``None`` keeps all.
        sequence_length: characters per input sequence (TFF and the paper use 80).

    Returns:
        The dataset, named ``"shakespeare"``, with ``info`` counts of snippets
        (``num_train_snippets``, ``num_test_snippets``) and of sequences
        (``num_train_sequences``, ``num_test_sequences``).

    Raises:
        FileNotFoundError: a file is missing (the message says how to download it).
        ValueError: the files differ in roles, or a role's data is malformed; the message
            names the file and the role.
    """
    if sequence_length < 1:
        raise ValueError(f"sequence_length must be >= 1, got {sequence_length}")
    read = _shakespeare_examples(sequence_length)
    clients, num_train, num_test = _read_pair(train_path, test_path, "shakespeare", read, max_clients)
    info = {
        "num_train_snippets": num_train,
        "num_test_snippets": num_test,
        "num_train_sequences": sum(len(c.train) for c in clients.values()),
        "num_test_sequences": sum(len(c.test) for c in clients.values()),
    }
    return split_clients(clients, num_classes=SHAKESPEARE_VOCAB_SIZE, held_out_fraction=held_out_fraction,
                         seed=seed, name="shakespeare", info=info)
