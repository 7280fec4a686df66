"""The in-process engine: clients one after another on one reused model."""

from __future__ import annotations

import traceback
from typing import Sequence

from torch import nn

from fedmeta.client_work import ClientFailure, ClientWork, Result, check_on_error
from fedmeta.data.federated import ClientData
from fedmeta.engine.execution import Execution
from fedmeta.params import Params

class InProcessEngine:
    """Maps a pure function of (model, weights, client, seed) over clients, in order.

    The one model object is reused for every client; the work loads weights into it.
    Nothing runs in parallel, which makes this the engine to debug with.
    """

    def __init__(self, model: nn.Module, execution: Execution = Execution()) -> None:
        self.model = execution.prepare(model)
        self.execution = execution

    def map(self, work: ClientWork, weights: Params, clients: Sequence[ClientData],
            seeds: Sequence[int], *, on_error: str = "raise") -> list[Result | ClientFailure]:
        """Runs ``work`` on every client; results are in the order of ``clients``.

        With ``on_error="collect"`` a client whose work raises gets a ``ClientFailure``
        at its position and the others still run; ``"raise"`` lets the error through.
        """
        check_on_error(on_error)
        results: list[Result | ClientFailure] = []
        with self.execution.context():
            for client, seed in zip(clients, seeds, strict=True):
                try:
                    results.append(work(self.model, weights, client, seed))
                except Exception as error:
                    if on_error == "raise":
                        raise
                    results.append(ClientFailure(client.client_id, error, traceback.format_exc()))
        return results

    def close(self) -> None:
        """Releases nothing: here for the interface every engine shares."""

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
