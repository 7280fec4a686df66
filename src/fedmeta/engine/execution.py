"""How client work runs on a model: memory layout and precision, chosen by measurement.

``channels_last`` stores convolution weights (and so their activations) as NHWC, which
oneDNN's CPU kernels run faster than the default NCHW at the small batches of client
training (see ``benchmarks/README.md``); it leaves models without convolutions alone.
``bfloat16`` runs client work under CPU autocast: an opt-in, since it changes the
numbers and is only faster on CPUs with native bfloat16 units.

Client work always runs on one thread, in every engine: how a kernel splits a reduction
over threads changes its rounding, so a multi-threaded in-process run would not give the
bits of one-thread workers, Ray actors or Flower's simulation (on some CPUs and not others).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import ContextManager, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """Runs torch's intra-op work on one thread inside the block, restoring the count after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass(frozen=True)
class Execution:
    channels_last: bool = True
    bfloat16: bool = False

    def prepare(self, model: nn.Module) -> nn.Module:
        """Converts ``model`` in place (its parameters stay the same objects) and returns it."""
        if self.channels_last and any(p.dim() == 4 for p in model.parameters()):
            model.to(memory_format=torch.channels_last)
        return model

    @contextlib.contextmanager
    def context(self) -> Iterator[None]:
        """The context client work runs in: one thread, and bfloat16 autocast if chosen."""
        # no cast cache: it lives as long as the context, which spans a whole client's
        # training, so every step after the first would run on the first step's weights
        autocast: ContextManager = (torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)
                                    if self.bfloat16 else contextlib.nullcontext())
        with single_threaded(), autocast:
            yield
