"""Federated datasets: per-client train/test data, a held-out client split, and loaders."""

from fedmeta.data.download import DATASETS, DownloadError, dataset_paths, default_cache_dir, download
from fedmeta.data.federated import (
    IGNORE_INDEX, PAPER_HELD_OUT_FRACTION, ClientData, Examples, FederatedDataset, split_clients,
)
from fedmeta.data.leaf_json import load_leaf_json
from fedmeta.data.partition import dirichlet_partition, split_client_examples
from fedmeta.data.synthetic import synthetic
from fedmeta.data.tff_h5 import (
    EMNIST_CLASSES, SHAKESPEARE_VOCAB_SIZE, encode_snippet, load_emnist_h5, load_shakespeare_h5,
)

__all__ = [
    "DATASETS", "EMNIST_CLASSES", "IGNORE_INDEX", "PAPER_HELD_OUT_FRACTION", "SHAKESPEARE_VOCAB_SIZE",
    "ClientData", "DownloadError", "Examples", "FederatedDataset", "dataset_paths", "default_cache_dir",
    "dirichlet_partition", "download", "encode_snippet", "load_emnist_h5", "load_leaf_json",
    "load_shakespeare_h5", "split_client_examples", "split_clients", "synthetic",
]
