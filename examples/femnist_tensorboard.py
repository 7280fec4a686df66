"""FEMNIST with a CNN of your own through ``fedmeta.Experiment``, logging to TensorBoard.

The real FEMNIST files (``femnist_{train,test}.h5`` or TFF's ``fed_emnist_*``: one client
per writer, 62 classes) lie in ``--data-dir`` (default ``$FEDMETA_SHARED_DATA``, else
``../shared/data``; ``fedmeta data download emnist`` fetches TFF's). A small CNN defined
here trains with FedAvg; ``[logging] tensorboard = true`` sends each round's metrics row
to ``RUN_DIR/tensorboard/`` as ``metrics.jsonl`` gets it (``pip install "fedmeta[logging]"``).
``--smoke``: 2 rounds of 20 writers; without, 100 rounds of all of them.
"""

import argparse
from pathlib import Path

from torch import nn

import fedmeta
from fedmeta.experiment.reproduce.plan import default_data_dir, find_dataset

args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
args.add_argument("--smoke", action="store_true", help="2 rounds of 20 writers, seconds")
args.add_argument("--data-dir", type=Path, default=default_data_dir(), help="the folder holding femnist/")
options = args.parse_args()
smoke = options.smoke


class SmallCNN(nn.Module):
    """Two 5x5 convolutions (16 and 32 channels), each max-pooled, then 128 units: a quarter of the paper's CNN."""

    def __init__(self, num_classes: int = 62) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten())
        self.classifier = nn.Sequential(nn.Linear(32 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


config = {
    "name": "femnist_cnn", "rounds": 2 if smoke else 100,
    "data": {"kind": "emnist", "path": str(find_dataset(options.data_dir, "emnist", f"--data-dir {options.data_dir}")),
             **({"max_clients": 20} if smoke else {})},  # else all writers: 396 in the shared 5% sample
    "algorithm": {"cohort_size": 5 if smoke else 10, "client_lr": 0.05},
    "evaluation": {"every": 10, "max_clients": 5 if smoke else 50, "fine_tune_epochs": 1 if smoke else 3},
    "engine": {"workers": 0},
    "logging": {"tensorboard": True},
}
result = fedmeta.Experiment(config, model=SmallCNN()).run(progress=False)
last = result.history[-1]
print(f"run directory  {result.run_dir}")
print(f"accuracy       initial {last['initial/accuracy']:.4f}  personalized {last['personalized/accuracy']:.4f}")
print(f"TensorBoard    tensorboard --logdir {result.run_dir / 'tensorboard'}")
