"""Models of the paper's tasks; any ``torch.nn.Module`` works with fedmeta too."""

from fedmeta.models.cnn import FedAvgCNN, TFFCNN
from fedmeta.models.linear import LogisticRegression
from fedmeta.models.lstm import CharLSTM
from fedmeta.models.registry import MODELS, build_model

__all__ = ["FedAvgCNN", "TFFCNN", "CharLSTM", "LogisticRegression", "MODELS", "build_model"]
