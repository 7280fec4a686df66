"""Loaders for TensorFlow Federated's h5 files: ``/examples/<client>/<feature>``.

EMNIST-62 / FEMNIST (``pixels``, ``label``) as in ``fed_emnist_{train,test}.h5``, and
Shakespeare (``snippets``) as in ``shakespeare_{train,test}.h5``. Each client's
examples are already split across the train and test files; the loaders keep that
split and add the seeded split of clients into training and held-out clients.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import torch

from fedmeta.data.federated import (
    IGNORE_INDEX, PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients,
)

EMNIST_CLASSES = 62

# TFF's Shakespeare vocabulary (tff.simulation.datasets.shakespeare / federated_research):
# id 0 pads, characters are 1..86, then out-of-vocabulary, beginning and end of snippet.
CHAR_VOCAB = list("dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\naeimquyAEIMQUY]!%)-159\r")
PAD_ID = 0
OOV_ID = len(CHAR_VOCAB) + 1
BOS_ID = len(CHAR_VOCAB) + 2
EOS_ID = len(CHAR_VOCAB) + 3
SHAKESPEARE_VOCAB_SIZE = len(CHAR_VOCAB) + 4
SEQUENCE_LENGTH = 80

_BYTE_TO_ID = np.full(256, OOV_ID, dtype=np.int64)
_BYTE_TO_ID[[ord(c) for c in CHAR_VOCAB]] = np.arange(1, len(CHAR_VOCAB) + 1)


def _open(path: Path, download_name: str) -> h5py.File:
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{path}: no such file; run `fedmeta data download {download_name}` or point data.path at the "
            "directory holding the train/test h5 pair"
        )
    try:
        handle = h5py.File(path, "r")
    except OSError as error:
        raise ValueError(f"{path}: not a readable h5 file ({error})") from None
    if "examples" not in handle:
        handle.close()
        raise ValueError(f"{path}: no /examples group; expected TFF's layout /examples/<client>/<feature>")
    return handle


def _read_clients(path: Path, download_name: str, read: Callable[[str, h5py.Group], Examples],
                  max_clients: int | None) -> dict[str, Examples]:
    with _open(path, download_name) as handle:
        ids = sorted(handle["examples"])[:max_clients]
        return {cid: read(f"{path.name}: client {cid!r}", handle["examples"][cid]) for cid in ids}


def _feature(where: str, group: h5py.Group, name: str) -> np.ndarray:
    if name not in group:
        raise ValueError(f"{where} has no {name!r} dataset (has {sorted(group)})")
    return group[name][()]


def _pair(train: dict[str, Examples], test: dict[str, Examples], train_path: Path,
          test_path: Path) -> tuple[dict[str, ClientData], int]:
    """Joins per-client train and test parts; clients missing from either file are dropped."""
    common = sorted(set(train) & set(test))
    if not common:
        raise ValueError(f"{train_path.name} and {test_path.name} have no client in common")
    return {c: ClientData(c, train[c], test[c]) for c in common}, len(set(train) ^ set(test))


def _emnist_examples(where: str, group: h5py.Group) -> Examples:
    pixels = _feature(where, group, "pixels")
    labels = _feature(where, group, "label").astype(np.int64).reshape(-1)
    if pixels.ndim != 3 or pixels.shape[1:] != (28, 28):
        raise ValueError(f"{where}: pixels have shape {pixels.shape}, expected [n, 28, 28]")
    if len(labels) != len(pixels):
        raise ValueError(f"{where} has {len(labels)} labels but {len(pixels)} images")
    if len(labels) and not (labels.min() >= 0 and labels.max() < EMNIST_CLASSES):
        raise ValueError(f"{where}: labels must be in 0..{EMNIST_CLASSES - 1}, found {labels.min()}..{labels.max()}")
    if pixels.dtype == np.uint8:  # the LEAF-built files; TFF's official ones are float32 in [0, 1]
        x = pixels.astype(np.float32) / 255.0
    elif np.issubdtype(pixels.dtype, np.floating):
        x = pixels.astype(np.float32)
    else:
        raise ValueError(f"{where}: pixels have dtype {pixels.dtype}, expected uint8 or float32")
    return Examples(torch.from_numpy(x[:, None]), torch.from_numpy(labels))


def load_emnist_h5(train_path: str | Path, test_path: str | Path, *,
                   held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0,
                   max_clients: int | None = None) -> FederatedDataset:
    """EMNIST-62 writers as clients: x ``[n, 1, 28, 28]`` float32 in [0, 1], y in 0..61.

    ``max_clients`` keeps the first writers by id (for quick runs).
    """
    train_path, test_path = Path(train_path), Path(test_path)
    train = _read_clients(train_path, "emnist", _emnist_examples, max_clients)
    test = _read_clients(test_path, "emnist", _emnist_examples, max_clients)
    clients, unpaired = _pair(train, test, train_path, test_path)
    info = {
        "num_train_examples": sum(len(c.train) for c in clients.values()),
        "num_test_examples": sum(len(c.test) for c in clients.values()),
        "unpaired_clients": unpaired,
    }
    return split_clients(clients, num_classes=EMNIST_CLASSES, held_out_fraction=held_out_fraction, seed=seed,
                         name="emnist", info=info)


def encode_snippet(snippet: bytes, sequence_length: int = SEQUENCE_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """One snippet as next-character sequences: (inputs, targets), each ``[m, sequence_length]``.

    The ids are ``[BOS] + chars + [EOS]``; windows of ``sequence_length + 1`` ids start every
    ``sequence_length`` ids, so each next character is a target exactly once. The last
    window is padded: inputs with ``PAD_ID``, targets with ``IGNORE_INDEX``.
    """
    ids = np.concatenate([[BOS_ID], _BYTE_TO_ID[np.frombuffer(snippet, dtype=np.uint8)], [EOS_ID]])
    windows = -(-(len(ids) - 1) // sequence_length)
    padded = np.full(windows * sequence_length + 1, PAD_ID, dtype=np.int64)
    padded[: len(ids)] = ids
    starts = np.arange(windows)[:, None] * sequence_length + np.arange(sequence_length)[None, :]
    inputs, targets = padded[starts], padded[starts + 1]
    targets[starts + 1 >= len(ids)] = IGNORE_INDEX
    return inputs, targets


def _shakespeare_examples(sequence_length: int) -> Callable[[str, h5py.Group], Examples]:
    def read(where: str, group: h5py.Group) -> Examples:
        snippets = _feature(where, group, "snippets").reshape(-1)
        if snippets.dtype.kind not in "SO":
            raise ValueError(f"{where}: snippets have dtype {snippets.dtype}, expected bytes")
        parts = [encode_snippet(bytes(s), sequence_length) for s in snippets]
        if not parts:
            empty = torch.zeros((0, sequence_length), dtype=torch.int64)
            return Examples(empty, empty.clone())
        return Examples(torch.from_numpy(np.concatenate([p[0] for p in parts])),
                        torch.from_numpy(np.concatenate([p[1] for p in parts])))

    return read


def _count_snippets(path: Path, ids: list[str]) -> int:
    with h5py.File(path, "r") as handle:
        return sum(handle["examples"][c]["snippets"].shape[0] for c in ids)


def load_shakespeare_h5(train_path: str | Path, test_path: str | Path, *,
                        held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0,
                        max_clients: int | None = None,
                        sequence_length: int = SEQUENCE_LENGTH) -> FederatedDataset:
    """Speaking roles as clients: x, y ``[m, sequence_length]`` character ids (vocabulary 90).

    Targets are the inputs shifted by one; padding targets are ``IGNORE_INDEX``.
    """
    train_path, test_path = Path(train_path), Path(test_path)
    read = _shakespeare_examples(sequence_length)
    train = _read_clients(train_path, "shakespeare", read, max_clients)
    test = _read_clients(test_path, "shakespeare", read, max_clients)
    clients, unpaired = _pair(train, test, train_path, test_path)
    ids = sorted(clients)
    info = {
        "num_train_snippets": _count_snippets(train_path, ids),
        "num_test_snippets": _count_snippets(test_path, ids),
        "num_train_sequences": sum(len(c.train) for c in clients.values()),
        "num_test_sequences": sum(len(c.test) for c in clients.values()),
        "unpaired_clients": unpaired,
    }
    return split_clients(clients, num_classes=SHAKESPEARE_VOCAB_SIZE, held_out_fraction=held_out_fraction,
                         seed=seed, name="shakespeare", info=info)
