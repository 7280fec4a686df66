"""CNNs for 28x28 EMNIST images.

``FedAvgCNN`` is the CNN of McMahan et al. (2017) that Jiang et al. (2019) use for
EMNIST-62; ``TFFCNN`` is TensorFlow Federated's EMNIST baseline with dropout.
"""

from __future__ import annotations

import torch
from torch import nn


class FedAvgCNN(nn.Module):
    """Two 5x5 conv layers (32, 64 channels), each max-pooled, then 512 units: ~1.69M params."""

    def __init__(self, num_classes: int = 62) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.ReLU(), nn.Linear(512, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class TFFCNN(nn.Module):
    """TFF's EMNIST CNN: two 3x3 convs (32, 64), max-pool, dropout 0.25, 128 units, dropout 0.5."""

    def __init__(self, num_classes: int = 62) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Flatten(), nn.Linear(64 * 12 * 12, 128), nn.ReLU(), nn.Dropout(0.5),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
