"""The in-process engine: clients one after another on one reused model."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from torch import nn

from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import Execution
from fedmeta.params import Params

Result = TypeVar("Result")
ClientWork = Callable[[nn.Module, Params, ClientData, int], Result]


class InProcessEngine:
    """Maps a pure function of (model, weights, client, seed) over clients, in order.

    The one model object is reused for every client; the work loads weights into it.
    Nothing runs in parallel, which makes this the engine to debug with.
    """

    def __init__(self, model: nn.Module, execution: Execution = Execution()) -> None:
        self.model = execution.prepare(model)
        self.execution = execution

    def map(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
            seeds: Sequence[int]) -> list[Result]:
        with self.execution.context():
            return [work(self.model, weights, client, seed) for client, seed in zip(clients, seeds, strict=True)]

    def close(self) -> None:
        """Releases nothing: here for the interface every engine shares."""

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
