"""The Shakespeare next-character LSTM of the FedAvg and personalization papers."""

from __future__ import annotations

import torch
from torch import nn


class CharLSTM(nn.Module):
    """Embedding 8, two LSTM layers of 256, a logit per character at every position.

    Input: token ids ``[batch, time]``; output: logits ``[batch, time, vocab_size]``.
    """

    def __init__(self, vocab_size: int = 90, embedding_dim: int = 8, hidden_size: int = 256) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim)
        self.lstm = nn.LSTM(embedding_dim, hidden_size, num_layers=2, batch_first=True)
        self.output = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.lstm(self.embedding(tokens))
        return self.output(hidden)
