"""Loader for LEAF's json shards: ``{"users", "num_samples", "user_data": {uid: {"x", "y"}}}``.

LEAF writes one directory of train shards and one of test shards (``train/*.json``,
``test/*.json``), or a pair of files side by side (``..._train_9.json``,
``..._test_9.json``). Users are merged across shards.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedmeta.data.federated import PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients

FEMNIST_IMAGE_SHAPE = (1, 28, 28)


def leaf_files(root: Path) -> tuple[list[Path], list[Path]]:
    """Finds the train and test shards under ``root``: ``train/``, ``test/``, or side by side."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory of LEAF json files")
    if (root / "train").is_dir() and (root / "test").is_dir():
        return sorted((root / "train").glob("*.json")), sorted((root / "test").glob("*.json"))
    return sorted(root.glob("*_train*.json")), sorted(root.glob("*_test*.json"))


def _read_shard(path: Path) -> dict[str, tuple[list, list]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: invalid json ({error})") from None
    if not isinstance(data, dict) or "user_data" not in data:
        raise ValueError(f"{path}: not a LEAF shard (no 'user_data')")
    users = {}
    for uid, record in data["user_data"].items():
        if not isinstance(record, dict) or "x" not in record or "y" not in record:
            raise ValueError(f"{path}: user {uid!r} has no 'x' and 'y'")
        if len(record["x"]) != len(record["y"]):
            raise ValueError(f"{path}: user {uid!r} has {len(record['y'])} labels but {len(record['x'])} inputs")
        users[uid] = (record["x"], record["y"])
    return users


def _read_split(files: Sequence[Path], image_shape: tuple[int, ...] | None) -> dict[str, Examples]:
    merged: dict[str, tuple[list, list]] = {}
    for path in files:
        for uid, (x, y) in _read_shard(path).items():
            xs, ys = merged.setdefault(uid, ([], []))
            xs.extend(x)
            ys.extend(y)
    examples = {}
    for uid, (x, y) in merged.items():
        inputs = np.asarray(x, dtype=np.float32)
        if image_shape is not None:
            inputs = inputs.reshape(len(x), *image_shape)
        examples[uid] = Examples(torch.from_numpy(inputs), torch.as_tensor(y, dtype=torch.int64))
    return examples


def load_leaf_json(root: str | Path, *, held_out_fraction: float = PAPER_HELD_OUT_FRACTION, seed: int = 0,
                   max_clients: int | None = None, num_classes: int | None = None,
                   image_shape: tuple[int, ...] | None = FEMNIST_IMAGE_SHAPE) -> FederatedDataset:
    """LEAF users as clients, from the shards found by ``leaf_files(root)``.

    Inputs are reshaped to ``image_shape`` (FEMNIST's by default; ``None`` keeps them
    flat). ``num_classes`` defaults to the largest label plus one.
    """
    root = Path(root)
    train_files, test_files = leaf_files(root)
    if not train_files or not test_files:
        raise FileNotFoundError(f"{root}: expected train/*.json and test/*.json, or *_train*.json beside "
                                f"*_test*.json; found {len(train_files)} train and {len(test_files)} test files")
    train, test = _read_split(train_files, image_shape), _read_split(test_files, image_shape)
    ids = sorted(set(train) & set(test))[:max_clients]
    clients = {uid: ClientData(uid, train[uid], test[uid]) for uid in ids}
    labels = torch.cat([torch.cat([c.train.y, c.test.y]) for c in clients.values()])
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    if len(labels) and int(labels.max()) >= classes:
        raise ValueError(f"{root}: label {int(labels.max())} is out of range for num_classes={classes}")
    info = {"num_train_examples": sum(len(c.train) for c in clients.values()),
            "num_test_examples": sum(len(c.test) for c in clients.values())}
    return split_clients(clients, num_classes=classes, held_out_fraction=held_out_fraction, seed=seed,
                         name="leaf_json", info=info)
