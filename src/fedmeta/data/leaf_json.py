"""Loader for LEAF's json shards: ``{"users", "num_samples", "user_data": {uid: {"x", "y"}}}``.

LEAF (Caldas et al., 2018) writes the train shards and the test shards of one run
either into ``train/`` and ``test/`` directories or side by side
(``all_data_0_niid_05_keep_0_train_9.json`` beside ``..._test_9.json``). A user's
examples may be spread over several shards; they are merged in file order.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients

FEMNIST_IMAGE_SHAPE = (1, 28, 28)

JsonFiles = str | Path | Sequence[str | Path]
"""A json file, a directory of them (``*.json``), or a list of files."""


def _json_files(spec: JsonFiles) -> list[Path]:
    paths = [Path(spec)] if isinstance(spec, (str, Path)) else [Path(p) for p in spec]
    files = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.json") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such LEAF json file or directory")
    return files


def _split_files(train: JsonFiles, test: JsonFiles | None) -> tuple[list[Path], list[Path]]:
    """The train and test shards: as given, or found in the directory ``train`` when ``test`` is None."""
    if test is not None:
        train_files, test_files = _json_files(train), _json_files(test)
        if not train_files or not test_files:
            raise FileNotFoundError(f"no LEAF json files: {len(train_files)} in {train}, {len(test_files)} in {test}")
        return train_files, test_files
    if not isinstance(train, (str, Path)) or not Path(train).is_dir():
        if isinstance(train, (str, Path)) and not Path(train).exists():
            raise FileNotFoundError(f"{train}: no such directory of LEAF json files")
        raise FileNotFoundError(f"{train}: not a directory of LEAF json files; pass test= as well to read files")
    root = Path(train)
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_files, test_files = _json_files(root / "train"), _json_files(root / "test")
    else:
        train_files = sorted(p for p in root.glob("*_train*.json") if p.is_file())
        test_files = sorted(p for p in root.glob("*_test*.json") if p.is_file())
    if not train_files or not test_files:
        raise FileNotFoundError(f"{root}: expected train/*.json and test/*.json, or *_train*.json beside "
                                f"*_test*.json; found {len(train_files)} train and {len(test_files)} test files")
    return train_files, test_files


def _user_arrays(where: str, record: object, image_shape: tuple[int, ...] | None,
                 num_classes: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One user's ``x`` (reshaped to ``image_shape``) and ``y``, checked; ``where`` names the shard and user."""
    if not isinstance(record, dict) or "x" not in record or "y" not in record:
        raise ValueError(f"{where} has no 'x' and 'y'")
    try:
        with np.errstate(over="ignore"):  # a value beyond float32 becomes inf, refused below
            x = np.asarray(record["x"], dtype=np.float32)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{where}: 'x' must be equal-length lists of numbers") from None
    try:
        y = np.asarray(record["y"])
    except ValueError:  # ragged
        y = np.asarray(None)
    if y.ndim != 1:
        raise ValueError(f"{where}: 'y' must be a list of integer labels, got {str(record['y'])[:40]}")
    if x.ndim == 0 or len(x) != len(y):
        raise ValueError(f"{where} has {len(y)} labels but {len(x) if x.ndim else 'no list of'} inputs")
    if len(y) == 0:  # nothing to check or reshape; the caller skips the user
        return x, y
    if x.ndim < 2 or 0 in x.shape[1:]:
        raise ValueError(f"{where}: 'x' must be a list of inputs, each a non-empty list of numbers, "
                         f"got {str(record['x'])[:40]}")
    if y.dtype.kind not in "iu":
        raise ValueError(f"{where}: 'y' must be a list of integer labels, got {str(record['y'])[:40]}")
    if not np.isfinite(x).all():
        raise ValueError(f"{where}: 'x' holds non-finite values (NaN or infinity, or beyond float32)")
    if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
        raise ValueError(f"{where}: labels must be in 0..{'' if num_classes is None else num_classes - 1}, "
                         f"found {y.min()}..{y.max()}")
    if image_shape is not None:
        if x.ndim != 2 or x.shape[1] != math.prod(image_shape):
            raise ValueError(f"{where}: inputs of shape {x.shape[1:]} cannot be reshaped to {image_shape}")
        x = x.reshape(len(x), *image_shape)
    return x, y.astype(np.int64)


def _read_json(path: Path) -> object:
    """The file's json; every way it can fail to be json is one ValueError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error.strerror})") from None
    if not raw.strip():
        raise ValueError(f"{path}: empty file ({len(raw)} bytes); expected a LEAF json shard")
    try:
        return json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text (byte 0x{raw[error.start]:02x} at offset {error.start}); "
                         "expected a LEAF json shard") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid json ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: invalid json (nested too deeply)") from None


def _read_shards(files: Sequence[Path], image_shape: tuple[int, ...] | None,
                 num_classes: int | None) -> dict[str, Examples]:
    """Every user of ``files`` with examples, concatenated over shards in file order."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    first: tuple[str, tuple[int, ...]] | None = None  # the first user's input shape, which all must share
    for path in files:
        data = _read_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("user_data"), dict):
            raise ValueError(f"{path}: not a LEAF shard (no 'user_data' object)")
        for uid, record in data["user_data"].items():
            where = f"{path}: user {uid!r}"
            x, y = _user_arrays(where, record, image_shape, num_classes)
            if not len(y):
                continue
            first = first or (where, x.shape[1:])
            if x.shape[1:] != first[1]:
                raise ValueError(f"{where}: inputs of shape {x.shape[1:]}, but {first[0]} has {first[1]}")
            parts.setdefault(uid, []).append((x, y))
    return {uid: Examples(torch.from_numpy(np.concatenate([x for x, _ in arrays])),
                          torch.from_numpy(np.concatenate([y for _, y in arrays])))
            for uid, arrays in parts.items()}


def load_leaf_json(train: JsonFiles, test: JsonFiles | None = None, *,
                   held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0,
                   max_clients: int | None = None, num_classes: int | None = None,
                   image_shape: tuple[int, ...] | None = FEMNIST_IMAGE_SHAPE) -> FederatedDataset:
    """LEAF users as clients, each with LEAF's own train/test split of their examples.

    Either ``train`` and ``test`` each name the shards of one split (a file, a
    directory of ``*.json``, or a list of files), or ``test`` is left out and ``train``
    is a directory holding both: ``train/`` and ``test/`` subdirectories, or
    ``*_train*.json`` beside ``*_test*.json`` (as LEAF's sample pairs are).

    Args:
        train: the train shards, or the directory holding both splits.
        test: the test shards; ``None`` to find them beside the train shards.
        held_out_fraction: share of users only evaluated (see ``split_clients``).
        seed: seeds the split into training and held-out users.
        max_clients: keep only the first users by id (quick runs); ``None`` keeps all.
        num_classes: the label space; ``None`` infers the largest label plus one
            (pass 62 for FEMNIST, whose users rarely cover every class).
        image_shape: the shape of one input (FEMNIST's ``(1, 28, 28)`` by default);
            ``None`` keeps inputs as they are in the json (flat for Synthetic).

    Returns:
        The dataset, named ``"leaf_json"``, with ``info["num_train_examples"]``,
        ``info["num_test_examples"]`` and ``info["unpaired_users"]``: users found in
        only one split are dropped (a partial set of shards has them) and counted.

    Raises:
        FileNotFoundError: no shards were found; the message says where it looked.
        ValueError: a shard is malformed (the message names the file and the user), or
            a label is outside ``num_classes``.
    """
    train_files, test_files = _split_files(train, test)
    if max_clients is not None and max_clients < 2:
        raise ValueError(f"max_clients must be >= 2 (a training and a held-out client), got {max_clients}")
    train_users = _read_shards(train_files, image_shape, num_classes)
    test_users = _read_shards(test_files, image_shape, num_classes)
    ids = sorted(set(train_users) & set(test_users))[:max_clients]
    if len(ids) < 2:
        raise ValueError(f"{train_files[0]}: {len(ids)} users have both train and test examples "
                         f"({len(train_users)} users in train, {len(test_users)} in {test_files[0].name}); "
                         "at least 2 are needed (a training and a held-out client)")
    clients = {uid: ClientData(uid, train_users[uid], test_users[uid]) for uid in ids}
    if num_classes is None:
        num_classes = 1 + max(int(torch.cat([c.train.y, c.test.y]).max()) for c in clients.values())
    info = {
        "num_train_examples": sum(len(c.train) for c in clients.values()),
        "num_test_examples": sum(len(c.test) for c in clients.values()),
        "unpaired_users": len(set(train_users) ^ set(test_users)),
    }
    return split_clients(clients, num_classes=num_classes, held_out_fraction=held_out_fraction, seed=seed,
                         name="leaf_json", info=info)
