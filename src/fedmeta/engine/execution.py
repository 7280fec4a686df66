"""How client work runs on a model: memory layout and precision, chosen by measurement.

``channels_last`` stores convolution weights (and so their activations) as NHWC, which
oneDNN's CPU kernels run faster than the default NCHW at the small batches of client
training (see ``benchmarks/README.md``); it leaves models without convolutions alone.
``bfloat16`` runs client work under CPU autocast: an opt-in, since it changes the
numbers and is only faster on CPUs with native bfloat16 units.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager

import torch
from torch import nn


@dataclass(frozen=True)
class Execution:
    channels_last: bool = True
    bfloat16: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        """Converts ``model`` in place (its parameters stay the same objects) and returns it."""
        if self.channels_last and any(p.dim() == 4 for p in model.parameters()):
            model.to(memory_format=torch.channels_last)
        return model

    def context(self) -> ContextManager:
        """The context client work runs in: bfloat16 autocast, or nothing."""
        if self.bfloat16:
            # no cast cache: it lives as long as the context, which spans a whole client's
            # training, so every step after the first would run on the first step's weights
            return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
        return contextlib.nullcontext()
